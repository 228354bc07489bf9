//! The HTTPS edge. Today it serves a status page, a health check and the
//! local CA certificate (so phones and browsers can be told to trust it);
//! the admin console will grow here.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

/// HTTPS connections served at once; more wait in the kernel's backlog
/// until one ends. The console has a handful of users; the bound keeps
/// a flood of idle connections from taking the file descriptors SIP and
/// media need.
const MAX_HTTPS_CONNECTIONS: usize = 256;
/// Time for a TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time for a request's headers, counted from when the connection waits
/// for one: a client that trickles them (or sends nothing) is closed.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct WebState {
    pub ca_cert: PathBuf,
    pub domain: String,
}

pub fn app(state: WebState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/healthz", get(|| async { "ok" }))
        .route("/ca.crt", get(ca_cert))
        .route("/static/parley.css", get(stylesheet))
        .with_state(Arc::new(state))
}

#[derive(askama::Template)]
#[template(path = "status.html")]
struct StatusPage<'a> {
    domain: &'a str,
    version: &'a str,
}

async fn index(State(s): State<Arc<WebState>>) -> Response {
    let page = StatusPage {
        domain: &s.domain,
        version: env!("CARGO_PKG_VERSION"),
    };
    match askama::Template::render(&page) {
        Ok(html) => Html(html).into_response(),
        Err(e) => {
            tracing::error!("status page: {e}");
            (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
        }
    }
}

/// The stylesheet, compiled into the binary like the templates.
async fn stylesheet() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("../../static/parley.css"),
    )
        .into_response()
}

async fn ca_cert(State(s): State<Arc<WebState>>) -> Response {
    match tokio::fs::read(&s.ca_cert).await {
        Ok(pem) => ([(header::CONTENT_TYPE, "application/x-pem-file")], pem).into_response(),
        Err(e) => {
            tracing::warn!(path = %s.ca_cert.display(), "cannot read CA certificate: {e}");
            (StatusCode::NOT_FOUND, "no CA certificate").into_response()
        }
    }
}

/// Serves `router` over TLS until the process ends.
pub async fn serve_https(listener: TcpListener, tls: TlsAcceptor, router: Router) {
    serve_https_with(listener, tls, router, HEADER_READ_TIMEOUT).await
}

async fn serve_https_with(
    listener: TcpListener,
    tls: TlsAcceptor,
    router: Router,
    header_timeout: Duration,
) {
    let service = TowerToHyperService::new(router);
    let permits = Arc::new(Semaphore::new(MAX_HTTPS_CONNECTIONS));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let (tcp, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("HTTPS accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let tls = tls.clone();
        let service = service.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                Ok(Ok(s)) => s,
                _ => {
                    tracing::debug!(%remote, "HTTPS handshake failed");
                    return;
                }
            };
            let mut builder = auto::Builder::new(TokioExecutor::new());
            // hyper keeps its header timeout off unless given a timer.
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            builder
                .http2()
                .timer(TokioTimer::new())
                .keep_alive_interval(Some(Duration::from_secs(30)))
                .max_concurrent_streams(32);
            if let Err(e) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%remote, "HTTPS connection ended: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use rustls::pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tower::ServiceExt;

    use super::*;
    use crate::tls::{CertPaths, Identity, ReloadingResolver};

    /// A client that completes TLS and then trickles a request (or sends
    /// nothing) is closed once the header time is up.
    #[tokio::test]
    async fn a_client_that_never_finishes_its_headers_is_closed() {
        let dir = tempfile::tempdir().unwrap();
        let paths = CertPaths::new(
            dir.path(),
            dir.path().join("certs/server.crt"),
            dir.path().join("certs/server.key"),
        );
        crate::tls::ensure_certificates(&paths, &Identity::new("parley.test", [])).unwrap();
        let resolver =
            ReloadingResolver::new(paths.server_cert.clone(), paths.server_key.clone()).unwrap();
        let acceptor =
            TlsAcceptor::from(crate::tls::server_config(resolver, &[b"http/1.1"]).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = app(WebState {
            ca_cert: paths.ca_cert.clone(),
            domain: "parley.test".into(),
        });
        tokio::spawn(serve_https_with(
            listener,
            acceptor,
            router,
            Duration::from_secs(1),
        ));

        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_file_iter(&paths.ca_cert).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("parley.test").unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        tls.write_all(b"GET / HTTP/1.1\r\nHost: parley.test\r\n")
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let mut buf = [0u8; 512];
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "still open after 10 s");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn health_and_ca_download() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
        let app = app(WebState {
            ca_cert: ca,
            domain: "pbx<script>".into(),
        });
        let r = app
            .clone()
            .oneshot(Request::get("/healthz").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let r = app
            .clone()
            .oneshot(Request::get("/ca.crt").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/x-pem-file");
        let r = app
            .oneshot(Request::get("/").body(Body::empty()).unwrap())
            .await
            .unwrap();
        let body = axum::body::to_bytes(r.into_body(), 10_000).await.unwrap();
        let body = String::from_utf8_lossy(&body);
        assert!(body.contains("Phone system for pbx"), "{body}");
        assert!(!body.contains("<script>"), "the domain is escaped: {body}");
    }
}
