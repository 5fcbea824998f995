//! Re-running this test binary as a child process, for tests that kill a
//! process (`kill -9`) or hold a resource in another one. The child is a
//! `#[test]` of the same binary, picked with `--exact` by its path as
//! `cargo test -- --list` shows it (`module::name` in a binary that groups
//! several files), and learns its role from environment variables the
//! parent sets.
//!
//! ```ignore
//! let mut child = Child::spawn(child::ignored_test(module_path!(), "crash_child").env(DIR, dir));
//! child.wait_for_line(Duration::from_secs(60), |line| line.contains("ACK "));
//! let lines = child.kill();
//! ```

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The libtest name of the test `name` defined in the module whose
/// `module_path!()` is `module`: the path without the crate (the binary's
/// name), as `--exact` wants it.
pub fn test_name(module: &str, name: &str) -> String {
    match module.split_once("::") {
        Some((_, inner)) => format!("{inner}::{name}"),
        None => name.to_owned(),
    }
}

/// A command that runs only the test `name` of `module` (pass
/// `module_path!()`) in this binary, on one thread, with its output shown.
pub fn test(module: &str, name: &str) -> Command {
    let mut command = Command::new(std::env::current_exe().expect("the test binary's path"));
    command.args([
        "--exact",
        &test_name(module, name),
        "--nocapture",
        "--test-threads=1",
    ]);
    command
}

/// As [`test`], for a child test marked `#[ignore]` (so that a normal run
/// of the binary skips it).
pub fn ignored_test(module: &str, name: &str) -> Command {
    let mut command = test(module, name);
    command.arg("--ignored");
    command
}

/// Sends every line read from `output` to `sink` until the output ends or
/// the sink refuses one; on a thread of its own.
pub fn forward_lines(
    output: impl Read + Send + 'static,
    mut sink: impl FnMut(String) -> bool + Send + 'static,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(output).lines() {
            let Ok(line) = line else { break };
            if !sink(line) {
                break;
            }
        }
    })
}

/// A running child whose standard output is read line by line.
#[derive(Debug)]
pub struct Child {
    process: std::process::Child,
    lines: mpsc::Receiver<String>,
    reader: Option<JoinHandle<()>>,
    /// Lines taken by `wait_for_line`, given back by `kill` and `wait`.
    taken: Vec<String>,
}

impl Child {
    /// Starts `command` with its standard output piped to a reader thread
    /// (standard error as the command says; null unless set).
    pub fn spawn(mut command: Command) -> Self {
        let mut process = command
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the child process");
        let stdout = process.stdout.take().expect("piped stdout");
        let (sender, lines) = mpsc::channel();
        let reader = forward_lines(stdout, move |line| sender.send(line).is_ok());
        Self {
            process,
            lines,
            reader: Some(reader),
            taken: Vec::new(),
        }
    }

    /// Waits (at most `timeout`) for a line that `wanted` accepts; returns
    /// it, or `None` when the time ran out or the output ended. The lines
    /// read meanwhile are kept for [`Child::kill`] and [`Child::wait`].
    pub fn wait_for_line(
        &mut self,
        timeout: Duration,
        mut wanted: impl FnMut(&str) -> bool,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.taken.push(line.clone());
            if wanted(&line) {
                return Some(line);
            }
        }
        None
    }

    /// Whether the child exited (without waiting).
    pub fn exited(&mut self) -> bool {
        self.process.try_wait().expect("poll the child").is_some()
    }

    /// The child process itself (its stdin, its id).
    pub fn process(&mut self) -> &mut std::process::Child {
        &mut self.process
    }

    /// Kills the child with SIGKILL (`kill -9`), waits for it, and returns
    /// every line it printed (the last may be cut short by the kill).
    pub fn kill(mut self) -> Vec<String> {
        self.process.kill().expect("SIGKILL the child");
        self.process.wait().expect("reap the child");
        self.rest()
    }

    /// Waits for the child to exit; returns its status and every line it
    /// printed.
    pub fn wait(mut self) -> (std::process::ExitStatus, Vec<String>) {
        let status = self.process.wait().expect("wait for the child");
        (status, self.rest())
    }

    fn rest(&mut self) -> Vec<String> {
        if let Some(reader) = self.reader.take() {
            reader.join().expect("the line reader");
        }
        let mut lines = std::mem::take(&mut self.taken);
        lines.extend(self.lines.try_iter());
        lines
    }
}
