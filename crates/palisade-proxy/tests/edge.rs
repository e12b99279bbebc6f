//! The HTTP edge attacked as an outside client would: path spellings that
//! dodge route limits, smuggled `Host` headers, forged forwarding headers.
//! Real daemon, real sockets, raw bytes where a polite client would refuse
//! to send them.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Harness, get_requests, raw_exchange};

/// A GET head for `path` on `Host: test.local`.
fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: test.local\r\n")
}

/// Each head, on its own connection, is answered 200.
async fn all_served<S: AsRef<str>>(h: &Harness, source: &str, heads: impl IntoIterator<Item = S>) {
    for head in heads {
        let head = head.as_ref();
        let (status, body) = raw_get(h, source, head).await;
        assert_eq!(status, 200, "{head}: {body}");
    }
}

/// Each head, on its own connection, is answered 400 and never reaches the
/// upstream.
async fn all_400_unforwarded<S: AsRef<str>>(h: &Harness, source: &str, heads: impl IntoIterator<Item = S>) {
    let hits = h.hits();
    for head in heads {
        let head = head.as_ref();
        let (status, body) = raw_get(h, source, head).await;
        assert_eq!(status, 400, "{head}: {body}");
    }
    assert_eq!(h.hits(), hits);
}

/// One request on its own connection; the status code and the body.
async fn raw_get(h: &Harness, source: &str, head: &str) -> (u16, String) {
    let text = raw_exchange(
        source,
        h.proxy(),
        format!("{head}Connection: close\r\n\r\n").as_bytes(),
    )
    .await;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}

#[tokio::test]
async fn every_spelling_of_a_limited_path_counts_against_its_route_and_is_forwarded_normalized() {
    let h = Harness::start(
        "",
        "[[routes]]\nname = \"hdr\"\npath_prefix = \"/headers\"\nrate = 1000\n",
    )
    .await;
    let spellings = [
        "/headers",
        "//headers",
        "/./headers",
        "/%68eaders",
        "/x/../headers",
        "/x/%2e%2E/headers",
    ];
    for p in spellings {
        let (status, body) = raw_get(
            &h,
            "127.0.0.20",
            &format!("GET {p}?a=%2F HTTP/1.1\r\nHost: test.local\r\n"),
        )
        .await;
        assert_eq!(status, 200, "{p}: {body}");
        // The upstream gets the path the route matched, query untouched.
        assert!(body.starts_with("GET /headers?a=%2F HTTP/1.1\n"), "{p}: {body}");
    }
    // Case-insensitive by default: counted against the route too.
    let (status, _) = raw_get(&h, "127.0.0.20", "GET /Headers HTTP/1.1\r\nHost: test.local\r\n").await;
    assert_eq!(status, 404);
    let m = h.metrics().await;
    assert_eq!(get_requests(&m, "hdr", 200), spellings.len() as f64, "{m}");
    assert_eq!(get_requests(&m, "hdr", 404), 1.0);
    h.running.shutdown().await;
}

/// `case_sensitive = true` is a route's own choice: `/Headers` then is
/// another path, counted on the default route, while every other spelling
/// of `/headers` still counts against the route.
#[tokio::test]
async fn a_case_sensitive_route_counts_only_its_own_case() {
    let h = Harness::start(
        "",
        "[[routes]]\nname = \"hdr\"\npath_prefix = \"/headers\"\ncase_sensitive = true\nrate = 1000\n",
    )
    .await;
    for p in ["/headers", "/%68eaders", "/Headers", "/HEADERS"] {
        let (status, body) = raw_get(&h, "127.0.0.44", &get(p)).await;
        assert_ne!(status, 400, "{p}: {body}");
    }
    let m = h.metrics().await;
    assert_eq!(get_requests(&m, "hdr", 200), 2.0, "{m}");
    assert_eq!(get_requests(&m, "default", 404), 2.0, "{m}");
    h.running.shutdown().await;
}

#[tokio::test]
async fn an_encoded_slash_or_a_broken_escape_in_the_path_is_400_and_never_forwarded() {
    let h = Harness::start("", "").await;
    // `%25` before two hex digits: an upstream that decodes twice reads
    // `/%2568eaders` as `/headers`.
    let paths = [
        "/a%2Fb",
        "/a%2fheaders",
        "/a%5Cb",
        "/a%00",
        "/a%",
        "/a%zz",
        "/%2568eaders",
        "/%25%36%38eaders",
        "/a%252F",
    ];
    all_400_unforwarded(&h, "127.0.0.21", paths.map(get)).await;
    h.running.shutdown().await;
}

/// IIS, ASP.NET and WHATWG URL parsers (Node's `URL`) read a raw `\\` in a
/// path as `/`, so to them `/x\\..\\headers` is `/headers`: refused like
/// `%5C`, never forwarded and never left to the default route.
#[tokio::test]
async fn a_raw_backslash_in_the_path_is_400_and_never_forwarded() {
    let h = Harness::start("", "").await;
    let paths = ["/x\\..\\headers", "/x/..\\headers", "/\\headers", "/headers\\"];
    all_400_unforwarded(&h, "127.0.0.40", paths.map(get)).await;
    h.running.shutdown().await;
}

/// A reverse proxy has no business tunnelling `CONNECT`: it was forwarded
/// to the upstream as `CONNECT upstream-address`, and the client got its
/// connection closed without an answer. Now 405, never forwarded.
#[tokio::test]
async fn connect_is_405_and_never_forwarded() {
    let h = Harness::start("", "").await;
    for head in [
        "CONNECT test.local:80 HTTP/1.1\r\nHost: test.local:80\r\n",
        "CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n",
    ] {
        let (status, body) = raw_get(&h, "127.0.0.42", head).await;
        assert_eq!(status, 405, "{head}: {body}");
    }
    assert_eq!(h.hits(), 0);
    h.running.shutdown().await;
}

/// Tomcat, Jetty and Spring drop `;parameters` from each segment before
/// they route, so to them `/headers;x` is `/headers`: the route must count
/// it too, and the upstream gets the path as sent. A segment that is empty
/// or a dot segment once its parameters go (`/;x/headers`, `/..;/headers`)
/// means another resource to such a server than to one that keeps them:
/// refused.
#[tokio::test]
async fn path_parameters_do_not_dodge_a_route_and_ambiguous_ones_are_400() {
    let h = Harness::start(
        "",
        "[[routes]]\nname = \"hdr\"\npath_prefix = \"/headers\"\nrate = 1000\n",
    )
    .await;
    let counted = ["/headers;x", "/headers;a=1;b=2/y", "/headers/;jsessionid=1"];
    for p in counted {
        let (status, body) = raw_get(
            &h,
            "127.0.0.25",
            &format!("GET {p} HTTP/1.1\r\nHost: test.local\r\n"),
        )
        .await;
        assert_ne!(status, 400, "{p}: {body}");
    }
    // Forwarded as sent, parameters kept.
    let (status, body) = raw_get(
        &h,
        "127.0.0.25",
        "GET /headers/;jsessionid=1 HTTP/1.1\r\nHost: test.local\r\n",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.starts_with("GET /headers/;jsessionid=1 HTTP/1.1\n"),
        "{body}"
    );
    let m = h.metrics().await;
    let hdr: f64 = m
        .lines()
        .filter(|l| l.starts_with("palisade_requests_total{endpoint=\"hdr\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(hdr, (counted.len() + 1) as f64, "{m}");
    let ambiguous = [
        "/;x/headers",
        "/..;/headers",
        "/x/..;/headers",
        "/.;x/headers",
        "/%2E%2E;/headers",
    ];
    all_400_unforwarded(&h, "127.0.0.25", ambiguous.map(get)).await;
    h.running.shutdown().await;
}

#[tokio::test]
async fn two_host_headers_or_a_host_against_the_target_are_400_and_never_forwarded() {
    let h = Harness::start("", "").await;
    let heads = [
        "GET /headers HTTP/1.1\r\nHost: test.local\r\nHost: evil.example\r\n",
        "GET /headers HTTP/1.1\r\nHost: test.local\r\nHost: test.local\r\n",
        "GET http://evil.example/headers HTTP/1.1\r\nHost: test.local\r\n",
    ];
    all_400_unforwarded(&h, "127.0.0.22", heads).await;
    // An absolute-form target that agrees with Host is served.
    let (status, body) = raw_get(
        &h,
        "127.0.0.22",
        "GET http://TEST.local/headers HTTP/1.1\r\nHost: test.local\r\n",
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // HTTP/2: a Host line that disagrees with :authority.
    let mut sender = common::h2_client("127.0.0.22", h.proxy()).await;
    let req = http::Request::get("http://test.local/headers")
        .header("host", "evil.example")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), http::StatusCode::BAD_REQUEST);
    h.running.shutdown().await;
}

/// A host route is matched on the name however `Host` spells it: any case,
/// one trailing dot (`api.test.` is the same name in DNS), the default port.
/// A `Host` that is not ASCII must not slip past host routes: 400.
#[tokio::test]
async fn host_spellings_do_not_dodge_a_host_route_and_a_non_ascii_host_is_400() {
    let h = Harness::start(
        "",
        "[[routes]]\nname = \"api\"\nhost = \"api.test\"\nrate = 1000\n",
    )
    .await;
    let spellings = [
        "Host: api.test\r\n",
        "Host: API.Test\r\n",
        "Host: api.test.\r\n",
        "Host: api.test:80\r\n",
        "Host: api.test.:80\r\n",
    ];
    all_served(
        &h,
        "127.0.0.26",
        spellings.map(|host| format!("GET / HTTP/1.1\r\n{host}")),
    )
    .await;
    let m = h.metrics().await;
    assert_eq!(get_requests(&m, "api", 200), spellings.len() as f64, "{m}");
    let hits = h.hits();
    let text = raw_exchange(
        "127.0.0.26",
        h.proxy(),
        b"GET / HTTP/1.1\r\nHost: api.t\xffest\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
    assert_eq!(h.hits(), hits);
    h.running.shutdown().await;
}

/// A `Host` (or target authority) that is not a name, an IP literal and a
/// port is 400 (RFC 9112 §3.2): WHATWG and Go URL parsers read
/// `u@api.test`, `api.test/x`, `api.test#x`, `api.test?` and `api%2etest` as
/// `api.test`, so an upstream routing by such a parse gets the host route's
/// traffic without its limit. A name with an empty label (`api.test..`,
/// `.api.test`, `api..test`) is no DNS name either; one that trims every
/// trailing dot reads `api.test..` as `api.test`.
#[tokio::test]
async fn a_host_that_is_not_a_host_name_is_400_and_never_forwarded() {
    let h = Harness::start(
        "",
        "[[routes]]\nname = \"api\"\nhost = \"api.test\"\nrate = 1000\n",
    )
    .await;
    let heads = [
        "GET / HTTP/1.1\r\nHost: u@api.test\r\n",
        "GET / HTTP/1.1\r\nHost: api.test/x\r\n",
        "GET / HTTP/1.1\r\nHost: api.test#x\r\n",
        "GET / HTTP/1.1\r\nHost: api.test?\r\n",
        "GET / HTTP/1.1\r\nHost: api%2etest\r\n",
        "GET / HTTP/1.1\r\nHost: api.test,x\r\n",
        "GET / HTTP/1.1\r\nHost: api.test:x\r\n",
        "GET / HTTP/1.1\r\nHost: [api.test]\r\n",
        "GET / HTTP/1.1\r\nHost: api.test..\r\n",
        "GET / HTTP/1.1\r\nHost: .api.test\r\n",
        "GET / HTTP/1.1\r\nHost: api..test\r\n",
        "GET http://u@api.test/ HTTP/1.1\r\nHost: u@api.test\r\n",
    ];
    all_400_unforwarded(&h, "127.0.0.41", heads).await;
    let served = [
        "GET / HTTP/1.1\r\nHost: api.test:8080\r\n",
        "GET / HTTP/1.1\r\nHost: [::1]:8080\r\n",
        "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n",
        "GET / HTTP/1.1\r\nHost: my_host.internal\r\n",
    ];
    all_served(&h, "127.0.0.41", served).await;
    h.running.shutdown().await;
}

/// An HTTP/1.1 request with no `Host` (and no absolute-form target) is 400
/// (RFC 9112 §3.2). Forwarded, it matched no host route and the upstream
/// got its own internal address as `Host`, so an upstream whose default
/// site is a limited host served it without that host's limit.
#[tokio::test]
async fn an_http11_request_without_host_is_400_and_never_forwarded() {
    let h = Harness::start(
        "",
        "[[routes]]\nname = \"api\"\nhost = \"api.test\"\nrate = 1000\n",
    )
    .await;
    let (status, body) = raw_get(&h, "127.0.0.43", "GET /headers HTTP/1.1\r\n").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(h.hits(), 0);
    // The target's authority stands in for it.
    let (status, body) = raw_get(&h, "127.0.0.43", "GET http://api.test/headers HTTP/1.1\r\n").await;
    assert_eq!(status, 200, "{body}");
    h.running.shutdown().await;
}

/// `Host` and an absolute-form target name the same authority when they
/// differ only by case, a trailing dot or the scheme's default port.
#[tokio::test]
async fn host_and_target_that_name_one_authority_are_served_others_are_400() {
    let h = Harness::start("", "").await;
    let served = [
        "GET http://test.local:80/headers HTTP/1.1\r\nHost: test.local\r\n",
        "GET http://test.local/headers HTTP/1.1\r\nHost: test.local:80\r\n",
        "GET http://test.local./headers HTTP/1.1\r\nHost: TEST.local\r\n",
    ];
    all_served(&h, "127.0.0.27", served).await;
    let heads = [
        "GET http://test.local:8080/headers HTTP/1.1\r\nHost: test.local\r\n",
        "GET http://test.local:443/headers HTTP/1.1\r\nHost: test.local\r\n",
        "GET http://test.local../headers HTTP/1.1\r\nHost: test.local\r\n",
    ];
    all_400_unforwarded(&h, "127.0.0.27", heads).await;
    h.running.shutdown().await;
}

/// HTTP/2 clients may split `Cookie` into one field per cookie (RFC 9113
/// §8.2.3, browsers do, to compress them better); passed on to HTTP/1.1
/// they must be one line joined by `; `. Forwarded as several `Cookie`
/// lines, an upstream that reads the first (or joins them with `, `) lost
/// the client's other cookies, its session among them.
#[tokio::test]
async fn h2_cookie_crumbs_reach_the_upstream_as_one_cookie_line() {
    let h = Harness::start("", "").await;
    let mut sender = common::h2_client("127.0.0.45", h.proxy()).await;
    let req = http::Request::get("http://test.local/headers")
        .header("cookie", "a=1")
        .header("cookie", "session=s3cr3t")
        .header("cookie", "b=2")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), http::StatusCode::OK);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let body = String::from_utf8_lossy(&body);
    let cookies: Vec<&str> = body.lines().filter(|l| l.starts_with("cookie:")).collect();
    assert_eq!(cookies, ["cookie: a=1; session=s3cr3t; b=2"], "{body}");
    h.running.shutdown().await;
}

/// An upstream that takes heads of any size (hyper's own server would
/// refuse more than 100 fields) and records how many header lines each
/// request had.
async fn field_counting_upstream() -> (std::net::SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<usize>>>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut s = tokio::io::BufReader::new(s);
                loop {
                    let mut fields = 0usize;
                    let mut line = String::new();
                    if s.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    loop {
                        line.clear();
                        if s.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        fields += 1;
                    }
                    log.lock().unwrap().push(fields);
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                    if s.get_mut().write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// `server.max_headers` holds for HTTP/2 as for HTTP/1.1 (where hyper
/// answers 431): an h2c request with 150 fields under `max_headers = 100`
/// reached the upstream with all of them. Cookie crumbs count as the one
/// line they are forwarded as.
#[tokio::test]
async fn h2_requests_with_more_fields_than_max_headers_are_431_and_never_forwarded() {
    let (upstream, seen) = field_counting_upstream().await;
    let h =
        Harness::start_with_upstream(&format!("http://{upstream}"), "max_headers = 100", "", upstream).await;
    let mut sender = common::h2_client("127.0.0.46", h.proxy()).await;
    let mut req = http::Request::get("http://test.local/");
    for i in 0..150 {
        req = req.header(format!("x-f{i}"), "v");
    }
    let resp = sender
        .send_request(req.body(http_body_util::Full::new(bytes::Bytes::new())).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert!(
        seen.lock().unwrap().is_empty(),
        "forwarded: {:?}",
        seen.lock().unwrap()
    );
    let mut req = http::Request::get("http://test.local/");
    for i in 0..90 {
        req = req.header(format!("x-f{i}"), "v");
    }
    for i in 0..30 {
        req = req.header("cookie", format!("c{i}=1"));
    }
    let resp = sender
        .send_request(req.body(http_body_util::Full::new(bytes::Bytes::new())).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), http::StatusCode::OK);
    // 90 fields, one Cookie line, Host and Palisade's five forwarding headers.
    assert_eq!(*seen.lock().unwrap(), [97]);
    h.running.shutdown().await;
}

#[tokio::test]
async fn connection_cannot_name_host_for_removal() {
    let h = Harness::start("", "").await;
    let (status, body) = raw_get(
        &h,
        "127.0.0.23",
        "GET /headers HTTP/1.1\r\nHost: test.local\r\nConnection: host, authorization\r\nAuthorization: Bearer abc\r\n",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\nhost: test.local\n"), "{body}");
    assert!(body.contains("\nauthorization: Bearer abc\n"), "{body}");
    h.running.shutdown().await;
}

#[tokio::test]
async fn an_untrusted_client_forwarding_headers_are_replaced_by_palisades_own() {
    let h = Harness::start("", "[clients]\ntrusted_proxies = [\"127.0.0.1/32\"]\n").await;
    let (status, body) = raw_get(
        &h,
        "127.0.0.24",
        "GET /headers HTTP/1.1\r\nHost: test.local\r\nX-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nX-Forwarded-Host: evil.example\r\nX-Forwarded-Proto: https\r\n",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains("6.6.6.6"), "{body}");
    assert!(!body.contains("evil.example"), "{body}");
    for line in [
        "x-forwarded-for: 127.0.0.24\n",
        "x-real-ip: 127.0.0.24\n",
        "x-forwarded-proto: http\n",
        "x-forwarded-host: test.local\n",
        "forwarded: for=127.0.0.24;proto=http;host=\"test.local\"\n",
    ] {
        assert!(body.contains(line), "{line}: {body}");
    }
    // A trusted proxy's chain is appended to, and X-Real-IP names the
    // client it resolves to.
    let (status, body) = raw_get(
        &h,
        "127.0.0.1",
        "GET /headers HTTP/1.1\r\nHost: test.local\r\nX-Forwarded-For: 198.51.100.7\r\nX-Real-IP: 6.6.6.6\r\n",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("x-forwarded-for: 198.51.100.7, 127.0.0.1\n"),
        "{body}"
    );
    assert!(body.contains("x-real-ip: 198.51.100.7\n"), "{body}");
    h.running.shutdown().await;
}

/// A client the kernel defense banned is refused before the limiter or its
/// reputation is charged: it gets the ban's 403 every time, never a 429, and
/// nothing about it is learned from requests it was never going to get in.
#[tokio::test]
async fn a_kernel_banned_client_is_refused_before_any_limit_is_charged() {
    let h = Harness::start(
        "",
        "[clients]\ntrusted_proxies = [\"127.0.0.1/32\"]\n[rate_limit]\nrate = 1\n\
         [syn]\nenabled = true\nfirewall = \"dry-run\"\n",
    )
    .await;
    let mut admin = h.admin_client().await;
    let ban = http::Request::post("/api/v1/bans")
        .header("host", "test.local")
        .header("authorization", "Bearer test-token-0123456789")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            br#"{"ip": "198.18.0.5", "duration": "10m"}"#,
        )))
        .unwrap();
    let (status, _, body) = admin.send(ban).await;
    assert_eq!(status, 200, "{body}");
    let mut proxy = h.client("127.0.0.1").await;
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(
            proxy
                .get_with("/", &[("x-forwarded-for", "198.18.0.5")])
                .await
                .0
                .as_u16(),
        );
    }
    assert_eq!(statuses, [403; 10]);
    let (_, _, body) = admin.get("/api/v1/reputation/198.18.0.5").await;
    assert!(!body.contains("\"kind\":\"flood\""), "{body}");
    h.running.shutdown().await;
}
