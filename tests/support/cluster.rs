//! A JetStream cluster of real `nats-server` processes on 127.0.0.1 (routes on loopback).
//!
//! Opt-in: a test file compiles it with `#[path = "support/cluster.rs"] mod cluster;` beside
//! `mod support;` (tests/chaos.rs).

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::support::{http_get, NatsServer};

/// `n` nodes named `n1`, `n2`, ... in cluster `chaos`, each a [`NatsServer`] with its own store
/// and ports, routed to every other node. Drop kills every node.
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `n` nodes of the binary `bin` at once (a lone node is not healthy until a quorum
    /// has formed) and waits until every one answers `/healthz`.
    pub fn start(bin: &Path, n: usize) -> NatsCluster {
        let cluster_ports: Vec<u16> = (0..n).map(|_| route_port()).collect();
        let threads: Vec<_> = (0..n)
            .map(|i| {
                let bin = bin.to_path_buf();
                let own = format!("nats://127.0.0.1:{}", cluster_ports[i]);
                let routes: Vec<String> = (0..n)
                    .filter(|&j| j != i)
                    .map(|j| format!("nats://127.0.0.1:{}", cluster_ports[j]))
                    .collect();
                std::thread::spawn(move || {
                    let name = format!("n{}", i + 1);
                    let routes = routes.join(",");
                    NatsServer::start_bin(
                        &bin,
                        &[
                            "--name",
                            &name,
                            "--cluster_name",
                            "chaos",
                            "--cluster",
                            &own,
                            "--routes",
                            &routes,
                        ],
                    )
                })
            })
            .collect();
        let mut nodes = Vec::new();
        let mut failure = None;
        for t in threads {
            match t.join() {
                Ok(node) => nodes.push(node),
                Err(e) => failure = Some(e),
            }
        }
        if let Some(e) = failure {
            drop(nodes);
            std::panic::resume_unwind(e);
        }
        NatsCluster { nodes }
    }

    /// How many nodes the cluster has (running or not).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Node `i` (0-based); its server name is `n{i+1}`.
    pub fn node(&mut self, i: usize) -> &mut NatsServer {
        &mut self.nodes[i]
    }

    /// The index of the node named `name` ("n2" is 1).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        let i: usize = name.strip_prefix('n')?.parse().ok()?;
        (1..=self.nodes.len()).contains(&i).then(|| i - 1)
    }

    /// Every node's client URL, comma-separated (the form `nats_url` takes).
    pub fn urls(&self) -> String {
        let urls: Vec<String> = self.nodes.iter().map(|n| n.url()).collect();
        urls.join(",")
    }

    /// The server name of the leader of `stream`, as the first node that answers sees it.
    pub fn stream_leader(&self, stream: &str) -> Option<String> {
        self.leaders(stream, None)
    }

    /// The server name of the leader of consumer `durable` on `stream`.
    pub fn consumer_leader(&self, stream: &str, durable: &str) -> Option<String> {
        self.leaders(stream, Some(durable))
    }

    /// The leader named by `/jsz` of any node that answers (nodes that are down are skipped).
    fn leaders(&self, stream: &str, durable: Option<&str>) -> Option<String> {
        self.nodes.iter().find_map(|node| {
            let url = format!("{}/jsz?consumers=true", node.monitor_url());
            let (200, body) = http_get(&url).ok()? else {
                return None;
            };
            let jsz: Value = serde_json::from_str(&body).ok()?;
            let streams = jsz["account_details"]
                .as_array()?
                .iter()
                .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten());
            let s = streams.clone().find(|s| s["name"] == stream)?;
            let item = match durable {
                None => s,
                Some(d) => s["consumer_detail"]
                    .as_array()?
                    .iter()
                    .find(|c| c["name"] == d)?,
            };
            item["cluster"]["leader"]
                .as_str()
                .filter(|l| !l.is_empty())
                .map(String::from)
        })
    }

    /// Asks the consumer's leader to step down (a new one is elected among the replicas);
    /// `Err` with the server's answer when it refused or did not answer.
    pub fn step_down_consumer(
        &self,
        nc: &::nats::Connection,
        stream: &str,
        durable: &str,
    ) -> Result<(), String> {
        let subject = format!("$JS.API.CONSUMER.LEADER.STEPDOWN.{stream}.{durable}");
        let reply = nc
            .request_timeout(&subject, b"", Duration::from_secs(5))
            .map_err(|e| format!("{subject}: {e}"))?;
        let v: Value = serde_json::from_slice(&reply.data).unwrap_or_default();
        if v["success"] == true {
            Ok(())
        } else {
            Err(format!(
                "{subject}: {}",
                String::from_utf8_lossy(&reply.data)
            ))
        }
    }
}

/// A port that was free a moment ago (bound on 127.0.0.1:0, then released), for a node's route
/// listener: the one fixture port picked ahead, a documented race. nats-server takes
/// `--cluster nats://127.0.0.1:-1` (an ephemeral route port), but a JetStream cluster node
/// refuses to start without configured routes ("JetStream cluster requires configured routes"),
/// so every node needs the others' route URLs on its command line before any starts (and they
/// start together: a lone node is never healthy). Client and monitor ports are the server's own
/// choice (`-p -1 -m -1`, read from the ports file).
fn route_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0 to find a free port")
}
