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
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

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
    let service = TowerToHyperService::new(router);
    loop {
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
            let stream = match tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)).await
            {
                Ok(Ok(s)) => s,
                _ => {
                    tracing::debug!(%remote, "HTTPS handshake failed");
                    return;
                }
            };
            let builder = auto::Builder::new(TokioExecutor::new());
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
    use tower::ServiceExt;

    use super::*;

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
