//! A real `redis-server`, started by a test on a free loopback port in a directory of its
//! own, and stopped (killed, its directory removed) when the handle drops. `.ci/run`
//! installs Redis where it is missing.

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// Arguments beyond the defaults (cluster mode, ACL users, TLS).
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers.
    pub fn start() -> Self {
        RedisServer::start_with(free_port(), &[])
    }

    /// Starts a server on `port` with `extra` arguments, and waits until it answers.
    pub fn start_with(port: u16, extra: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!("tca-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = RedisServer {
            port,
            dir,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.resume();
        server
    }

    /// What `redis-cli` prints for `args` against this server, trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        cli(self.port, args)
    }

    /// The `redis://` URL of this server.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops the server (an outage): clients see connection errors until [`resume`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, empty.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (bash .ci/run installs it: apt-get install -y redis-server)");
        self.child = Some(child);
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A real three-node Redis Cluster (no replicas), made by `redis-cli --cluster create`
/// over three `redis-server --cluster-enabled yes` on free loopback ports (each with
/// its cluster bus port, +10000, free too), stopped when the handle drops.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    _nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> Self {
        let mut nodes = Vec::new();
        while nodes.len() < 3 {
            let port = free_port();
            if port > 55_000 || TcpListener::bind(("127.0.0.1", port + 10_000)).is_err() {
                continue;
            }
            nodes.push(RedisServer::start_with(
                port,
                &["--cluster-enabled", "yes", "--cluster-node-timeout", "5000"],
            ));
        }
        let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
        let status = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(ports.iter().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli (it comes with redis-server)");
        assert!(status.success(), "redis-cli --cluster create failed");
        // Wait until every node sees all slots served.
        let started = Instant::now();
        for port in &ports {
            loop {
                let out = Command::new("redis-cli")
                    .args(["-p", &port.to_string(), "cluster", "info"])
                    .output()
                    .unwrap();
                if String::from_utf8_lossy(&out.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "the cluster never came up"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        RedisCluster {
            ports,
            _nodes: nodes,
        }
    }

    /// The `redis://` URLs of the nodes.
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What `redis-cli` prints for `args` against the server on `port`, trimmed.
pub fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
