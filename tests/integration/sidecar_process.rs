//! The real `backstop sidecar` binary as a process fed by an operator's config stream, with its
//! pod's token in a file and its state directory: for the config-stream and fleet tests.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::support::{Answer, chat, get, post};

const BIN: &str = env!("CARGO_BIN_EXE_backstop");

/// One pod's sidecar.
pub struct SidecarProcess {
    child: Child,
    /// Its LLM listener.
    pub llm: SocketAddr,
    /// Its admin listener.
    pub admin: SocketAddr,
    /// Its state directory.
    pub state_dir: PathBuf,
    /// Its token file.
    pub token_file: PathBuf,
    log: Arc<Mutex<String>>,
}

impl SidecarProcess {
    /// Starts a sidecar streaming from `control_plane` (trusting `ca`) with `token`, keeping
    /// its state in `dir` (where the token file goes too); `extra` arguments follow.
    pub async fn start(
        control_plane: SocketAddr,
        ca: &Path,
        token: &str,
        dir: &Path,
        extra: &[&str],
    ) -> SidecarProcess {
        std::fs::create_dir_all(dir).expect("sidecar dir");
        let token_file = dir.join("token");
        std::fs::write(&token_file, token).expect("token file");
        SidecarProcess::start_with_files(control_plane, ca, &token_file, &dir.join("state"), extra).await
    }

    /// A sidecar with the given token file and state directory.
    pub async fn start_with_files(
        control_plane: SocketAddr,
        ca: &Path,
        token_file: &Path,
        state_dir: &Path,
        extra: &[&str],
    ) -> SidecarProcess {
        let mut command = Command::new(BIN);
        command
            .args(["sidecar", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .arg("--control-plane")
            .arg(format!("https://{control_plane}"))
            .arg("--control-plane-ca")
            .arg(ca)
            .arg("--token-file")
            .arg(token_file)
            .arg("--state-dir")
            .arg(state_dir)
            .args(extra);
        SidecarProcess::from_command(command).await
    }

    /// A sidecar started by `command` (`backstop sidecar` with its settings), logging JSON.
    pub async fn from_command(mut command: Command) -> SidecarProcess {
        // Pass-through goes to a loopback port where nothing listens unless a test says where:
        // no test reaches the providers' public endpoints.
        for (name, value) in [
            ("BACKSTOP_PASSTHROUGH_OPENAI", "http://127.0.0.1:9/v1"),
            ("BACKSTOP_PASSTHROUGH_ANTHROPIC", "http://127.0.0.1:9"),
        ] {
            if !command.as_std().get_envs().any(|(key, _)| key == name) {
                command.env(name, value);
            }
        }
        let mut child = command
            .env("BACKSTOP_LOG_FORMAT", "json")
            .env("BACKSTOP_LOG", "debug,hyper=info,h2=info,rustls=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start backstop sidecar");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sink = log.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            let mut tx = Some(tx);
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(event) = serde_json::from_str::<Value>(&line)
                    && event["message"] == "backstop sidecar listening"
                    && let Some(tx) = tx.take()
                {
                    let address = |key: &str| event[key].as_str().and_then(|a| a.parse::<SocketAddr>().ok());
                    let _ = tx.send((address("llm"), address("admin")));
                }
                sink.lock().expect("lock").push_str(&(line + "\n"));
            }
        });
        let (llm, admin) = tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .expect("the sidecar listens within 10 s")
            .expect("listening line");
        let setting = |name: &str| {
            let found = command.as_std().get_envs().find(|(key, _)| *key == name).and_then(|(_, v)| v);
            let flag = format!("--{}", name.trim_start_matches("BACKSTOP_").to_lowercase().replace('_', "-"));
            let args: Vec<_> = command.as_std().get_args().collect();
            let given = args.iter().position(|a| *a == flag.as_str()).and_then(|i| args.get(i + 1)).copied();
            PathBuf::from(given.or(found).unwrap_or_default())
        };
        SidecarProcess {
            child,
            llm: llm.expect("llm address"),
            admin: admin.expect("admin address"),
            state_dir: setting("BACKSTOP_STATE_DIR"),
            token_file: setting("BACKSTOP_TOKEN_FILE"),
            log,
        }
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        self.log.lock().expect("lock").clone()
    }

    /// A chat request for `model`.
    pub async fn chat(&self, model: &str) -> Answer {
        let mut body = chat(false);
        body["model"] = model.into();
        post(&format!("http://{}/v1/chat/completions", self.llm), &body).await
    }

    /// GETs an admin path.
    pub async fn admin(&self, path: &str) -> Answer {
        get(&format!("http://{}{path}", self.admin)).await
    }

    /// Polls `check` on this sidecar every 50 ms until it holds, for at most `limit`; returns
    /// how long it took.
    pub async fn until<F, Fut>(&self, limit: Duration, what: &str, check: F) -> Duration
    where
        F: Fn() -> Fut,
        Fut: Future<Output = bool>,
    {
        let started = Instant::now();
        loop {
            if check().await {
                return started.elapsed();
            }
            assert!(started.elapsed() < limit, "{what}: not within {limit:?}; sidecar log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills it at once (SIGKILL), as a node failure would.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}
