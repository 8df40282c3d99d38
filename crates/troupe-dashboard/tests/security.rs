//! The dashboard's guards, over plain HTTP: the token, CSRF tokens, other sites' actions, the
//! bind address, and headers. (The escaping of message contents is checked in a real browser,
//! tests/browser.rs.)

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use troupe_core::{App, MemoryBroker};
use troupe_dashboard::Dashboard;

/// One HTTP/1.1 request; the status code, the headers (lower-case names) and the body.
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut text = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        text.push_str(&format!("{k}: {v}\r\n"));
    }
    text.push_str("\r\n");
    text.push_str(body);
    stream.write_all(text.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_owned())
}

fn app() -> App {
    App::builder(MemoryBroker::new().into_dyn()).build().unwrap()
}

fn cookie_value(head: &str, name: &str) -> String {
    head.lines()
        .find_map(|l| l.strip_prefix("set-cookie: ").filter(|c| c.starts_with(name)))
        .and_then(|c| c.split(';').next())
        .and_then(|c| c.split_once('='))
        .map(|(_, v)| v.to_owned())
        .unwrap_or_else(|| panic!("no {name} cookie in {head}"))
}

#[tokio::test]
async fn binding_beyond_loopback_needs_a_token() {
    let error = Dashboard::new(app())
        .start("0.0.0.0:0".parse().unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("without a token"), "{error}");
    let server = Dashboard::new(app())
        .token("s3cret")
        .start("0.0.0.0:0".parse().unwrap())
        .await
        .unwrap();
    assert_ne!(server.local_addr().port(), 0);
}

#[tokio::test]
async fn a_token_is_asked_once_and_kept_in_a_strict_cookie() {
    let server = Dashboard::new(app())
        .token("s3cret")
        .start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = server.local_addr();
    let (status, head, _) = request(addr, "GET", "/", &[], "").await;
    assert_eq!(status, 303, "to the login page: {head}");
    assert!(head.contains("location: /login"));
    let (status, _, _) = request(addr, "POST", "/dead/delete", &[], "all=1&confirm=yes").await;
    assert_eq!(status, 401, "no action without the token");
    let form = [("content-type", "application/x-www-form-urlencoded")];
    let (status, _, body) = request(addr, "POST", "/login", &form, "token=wrong").await;
    assert_eq!(status, 401);
    assert!(!body.contains("s3cret"), "the page never shows the token");
    let (status, head, _) = request(addr, "POST", "/login", &form, "token=s3cret").await;
    assert_eq!(status, 303, "{head}");
    assert!(head.contains("httponly") && head.contains("samesite=strict"), "{head}");
    let token = cookie_value(&head, "troupe_token");
    let cookie = format!("troupe_token={token}");
    let (status, _, _) = request(addr, "GET", "/", &[("cookie", &cookie)], "").await;
    assert_eq!(status, 200);
    let (status, _, _) = request(addr, "GET", "/", &[("authorization", "Bearer s3cret")], "").await;
    assert_eq!(status, 200, "scripts may send the token as a bearer");
}

#[tokio::test]
async fn actions_need_the_csrf_token_and_the_same_site() {
    let server = Dashboard::new(app())
        .start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = server.local_addr();
    let (status, head, body) = request(addr, "GET", "/dead", &[], "").await;
    assert_eq!(status, 200);
    for header in [
        "content-security-policy: default-src 'none'; script-src 'self'",
        "x-frame-options: deny",
        "x-content-type-options: nosniff",
    ] {
        assert!(head.contains(header), "{header} in {head}");
    }
    let csrf = cookie_value(&head, "troupe_csrf");
    assert!(
        body.contains(&format!("name=\"csrf\" value=\"{csrf}\"")),
        "the forms carry it"
    );
    let cookie = format!("troupe_csrf={csrf}");
    let form = |extra: &'static str| [("content-type", "application/x-www-form-urlencoded"), ("cookie", extra)];
    let cookie: &'static str = Box::leak(cookie.into_boxed_str());
    // No token, a wrong one, another site's page: refused.
    let (status, _, _) = request(addr, "POST", "/dead/delete", &form(cookie), "all=1&confirm=yes").await;
    assert_eq!(status, 403);
    let (status, _, _) = request(
        addr,
        "POST",
        "/dead/delete",
        &form(cookie),
        "csrf=0000&all=1&confirm=yes",
    )
    .await;
    assert_eq!(status, 403);
    let body = format!("csrf={csrf}&all=1&confirm=yes");
    let mut evil = form(cookie).to_vec();
    evil.push(("origin", "https://evil.example"));
    let (status, _, _) = request(addr, "POST", "/dead/delete", &evil, &body).await;
    assert_eq!(status, 403, "an action from another site");
    // The page's own form goes through.
    let (status, head, _) = request(addr, "POST", "/dead/delete", &form(cookie), &body).await;
    assert_eq!(status, 303, "{head}");
    assert!(head.contains("location: /dead?done=deleted%200"), "{head}");
    // And "all" needs its confirmation.
    let (status, _, _) = request(
        addr,
        "POST",
        "/dead/delete",
        &form(cookie),
        &format!("csrf={csrf}&all=1"),
    )
    .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn the_router_mounts_under_a_prefix() {
    let dashboard = Dashboard::new(app()).prefix("/admin/troupe");
    let router = axum::Router::new().nest("/admin/troupe", dashboard.router());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, router).await });
    let (status, _, body) = request(addr, "GET", "/admin/troupe", &[], "").await;
    assert_eq!(status, 200);
    assert!(
        body.contains("href=\"/admin/troupe/static/app.css\"") && body.contains("href=\"/admin/troupe/dead\""),
        "links under the prefix"
    );
    let (status, _, _) = request(addr, "GET", "/admin/troupe/static/app.js", &[], "").await;
    assert_eq!(status, 200);
    server.abort();
}
