//! gRPC through Palisade with a real gRPC server and client (Python
//! grpcio, tests/fixtures/grpc): client → h2c or TLS listener → Palisade
//! → `h2c://` upstream. Unary, bidirectional and server streaming keep
//! their messages, order and trailers; a rate-limited or denied call gets
//! a gRPC status its client reads (`RESOURCE_EXHAUSTED`,
//! `PERMISSION_DENIED`), not an HTTP error it would call `UNAVAILABLE`.
//!
//! Stubs are generated from echo.proto with grpc_tools.protoc into a temp
//! directory. Without grpcio these tests skip, saying so; under `CI=true`
//! that is a failure (`scripts/test` installs it).
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::Harness;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/grpc")
}

/// Generated stubs in a temp dir, or `None` (with the reason printed)
/// where grpcio is not installed, outside CI.
fn stubs(name: &str) -> Option<PathBuf> {
    let present = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !present {
        assert!(
            std::env::var("CI").is_err(),
            "grpcio is missing in CI: scripts/test installs it"
        );
        eprintln!(
            "skipped: python3 grpcio and grpcio-tools are not installed \
             (pip install --break-system-packages grpcio grpcio-tools)"
        );
        return None;
    }
    let dir = std::env::temp_dir().join(format!("palisade-grpc-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new("python3")
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(fixtures())
        .arg(format!("--python_out={}", dir.display()))
        .arg(format!("--grpc_python_out={}", dir.display()))
        .arg("echo.proto")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "protoc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(dir)
}

/// The grpcio server, killed on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(stubs: &Path) -> Self {
        let mut child = Command::new("python3")
            .arg(fixtures().join("peer.py"))
            .arg(stubs)
            .arg("server")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line
            .trim()
            .strip_prefix("port ")
            .unwrap_or_else(|| panic!("the grpc server said {line:?}"))
            .parse()
            .unwrap();
        Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs one client case of peer.py against `target` (over TLS trusting
/// `ca` when given) and returns its JSON line.
async fn client(stubs: &Path, target: &str, case: &str, ca: Option<&Path>) -> Value {
    let mut cmd = Command::new("python3");
    cmd.arg(fixtures().join("peer.py"))
        .arg(stubs)
        .args(["client", target, case]);
    if let Some(ca) = ca {
        cmd.arg(ca);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "grpc client {case}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn through_palisade(server: &Server, rest: &str) -> Harness {
    Harness::start_with_upstream(&format!("h2c://{}", server.addr), "", rest, server.addr).await
}

#[tokio::test]
async fn unary_and_bidirectional_streaming_calls_pass_with_their_trailers() {
    let Some(stubs) = stubs("calls") else { return };
    let server = Server::start(&stubs);
    let h = through_palisade(&server, "").await;
    let target = h.proxy().to_string();

    let unary = client(&stubs, &target, "unary", None).await;
    assert_eq!(unary["code"], "OK");
    assert_eq!(unary["seq"], 42);
    assert_eq!(unary["data"], "hello");
    assert_eq!(unary["trailers"]["x-served-by"], "grpcio");

    let chat = client(&stubs, &target, "chat", None).await;
    assert_eq!(chat["code"], "OK");
    assert_eq!(chat["count"], 2000);
    assert_eq!(chat["in_order"], true);
    assert_eq!(chat["trailers"]["x-chat"], "done");

    let m = h.metrics().await;
    // Both calls went upstream, none failed there.
    assert_eq!(
        common::metric(
            &m,
            "palisade_requests_total{endpoint=\"default\",method=\"POST\",status=\"200\"}"
        ),
        2.0
    );
}

#[tokio::test]
async fn a_large_server_stream_arrives_whole_through_flow_control() {
    let Some(stubs) = stubs("download") else { return };
    let server = Server::start(&stubs);
    let h = through_palisade(&server, "").await;
    let got = client(&stubs, &h.proxy().to_string(), "download", None).await;
    assert_eq!(got["code"], "OK");
    // 32 MiB: over a hundred times the 256 KiB stream window upstream.
    assert_eq!(got["bytes"], 512 * 64 * 1024);
    assert_eq!(got["in_order"], true);
}

#[tokio::test]
async fn a_call_over_the_tls_listener_reaches_the_h2c_upstream() {
    let Some(stubs) = stubs("tls") else { return };
    let server = Server::start(&stubs);
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(stubs.join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(stubs.join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
    let tls = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        stubs.join("cert.pem").display(),
        stubs.join("key.pem").display()
    );
    let h = through_palisade(&server, &tls).await;
    let target = format!("localhost:{}", h.proxy().port());
    let unary = client(&stubs, &target, "unary", Some(&stubs.join("cert.pem"))).await;
    assert_eq!(unary["code"], "OK");
    assert_eq!(unary["seq"], 42);
    assert_eq!(unary["trailers"]["x-served-by"], "grpcio");
}

#[tokio::test]
async fn calls_over_their_limit_are_resource_exhausted_in_grpc_terms() {
    let Some(stubs) = stubs("limited") else { return };
    let server = Server::start(&stubs);
    // Two calls an hour: the third and later are over, whatever the time.
    let route = "[[routes]]\nname = \"unary\"\npath_prefix = \"/palisade.test.Echo/Unary\"\n\
                 rate = \"1/h\"\nburst = 2\n";
    let h = through_palisade(&server, route).await;
    let got = client(&stubs, &h.proxy().to_string(), "limited", None).await;
    assert_eq!(
        got["codes"],
        serde_json::json!([
            "OK",
            "OK",
            "RESOURCE_EXHAUSTED",
            "RESOURCE_EXHAUSTED",
            "RESOURCE_EXHAUSTED",
            "RESOURCE_EXHAUSTED"
        ])
    );
    assert_eq!(got["detail"], "rate limited by palisade");
    // Counted as what they are: refusals.
    let m = h.metrics().await;
    assert_eq!(
        common::metric(
            &m,
            "palisade_requests_total{endpoint=\"unary\",method=\"POST\",status=\"429\"}"
        ),
        4.0
    );
}

#[tokio::test]
async fn a_denied_client_is_permission_denied_in_grpc_terms() {
    let Some(stubs) = stubs("denied") else { return };
    let server = Server::start(&stubs);
    // Denied by the address a trusted proxy forwards for: refused per
    // request (an address denied itself is refused at accept, before any
    // HTTP).
    let clients = "[clients]\ntrusted_proxies = [\"127.0.0.1/32\"]\ndeny = [\"192.0.2.0/24\"]\n";
    let h = through_palisade(&server, clients).await;
    let got = client(&stubs, &h.proxy().to_string(), "forwarded_for_denied", None).await;
    assert_eq!(got["codes"][0], "PERMISSION_DENIED");
    assert_eq!(got["codes"][5], "PERMISSION_DENIED");
    assert_eq!(got["detail"], "access denied by palisade");
}
