//! The web console: plain HTML, CSS and JavaScript modules from `crates/console/ui/`,
//! embedded in the binary (no build step, nothing loaded from elsewhere) and served at `/`
//! and `/ui/...` with a strict Content-Security-Policy.

use axum::Router;
use axum::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// Only the console's own scripts, styles and API: no inline code, no other origin, no
/// framing, no plugins.
pub const CONTENT_SECURITY_POLICY_VALUE: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; \
     frame-ancestors 'none'; base-uri 'none'";

/// One embedded file: its URL path, media type and content.
struct Asset {
    path: &'static str,
    media_type: &'static str,
    body: &'static str,
}

/// Every file of the UI.
const ASSETS: &[Asset] = &[
    Asset::new("/", HTML, include_str!("../ui/index.html")),
    Asset::new("/ui/app.css", CSS, include_str!("../ui/app.css")),
    Asset::new("/ui/app.js", JS, include_str!("../ui/app.js")),
    Asset::new("/ui/api.js", JS, include_str!("../ui/api.js")),
    Asset::new("/ui/users.js", JS, include_str!("../ui/users.js")),
    Asset::new("/ui/favicon.svg", SVG, include_str!("../ui/favicon.svg")),
];

const HTML: &str = "text/html; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const SVG: &str = "image/svg+xml";

impl Asset {
    const fn new(path: &'static str, media_type: &'static str, body: &'static str) -> Self {
        Self {
            path,
            media_type,
            body,
        }
    }
}

fn respond(asset: &'static Asset) -> Response {
    (
        StatusCode::OK,
        [
            (CONTENT_TYPE, HeaderValue::from_static(asset.media_type)),
            (
                CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CONTENT_SECURITY_POLICY_VALUE),
            ),
            // The page changes with the binary: always revalidate.
            (CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                HeaderName::from_static("x-content-type-options"),
                HeaderValue::from_static("nosniff"),
            ),
            (
                HeaderName::from_static("referrer-policy"),
                HeaderValue::from_static("no-referrer"),
            ),
            (
                HeaderName::from_static("x-frame-options"),
                HeaderValue::from_static("DENY"),
            ),
        ],
        asset.body,
    )
        .into_response()
}

/// The UI's routes (no state, no fallback: merged with the API router).
pub fn router() -> Router {
    let mut r = Router::new();
    for asset in ASSETS {
        r = r.route(asset.path, get(move || async move { respond(asset) }));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    #[tokio::test]
    async fn the_page_and_its_scripts_are_served_with_the_policy() {
        for (path, media) in [
            ("/", "text/html"),
            ("/ui/app.js", "text/javascript"),
            ("/ui/api.js", "text/javascript"),
            ("/ui/app.css", "text/css"),
        ] {
            let req = Request::get(path).body(Body::empty()).expect("request");
            let resp = router().oneshot(req).await.expect("response");
            assert_eq!(resp.status(), StatusCode::OK, "{path}");
            let h = resp.headers();
            let ct = h.get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
            assert!(ct.is_some_and(|c| c.starts_with(media)), "{path}: {ct:?}");
            let csp = h.get(CONTENT_SECURITY_POLICY).and_then(|v| v.to_str().ok());
            assert_eq!(csp, Some(CONTENT_SECURITY_POLICY_VALUE), "{path}");
            assert_eq!(
                h.get("x-content-type-options")
                    .and_then(|v| v.to_str().ok()),
                Some("nosniff")
            );
        }
        let req = Request::get("/ui/nothing.js")
            .body(Body::empty())
            .expect("request");
        let resp = router().oneshot(req).await.expect("response");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn every_script_and_style_the_page_names_is_served() {
        let page = ASSETS[0].body;
        for needle in ["/ui/app.js", "/ui/app.css", "/ui/favicon.svg"] {
            assert!(page.contains(needle), "index.html does not load {needle}");
        }
        // The CSP forbids inline code: the page must not carry any.
        assert!(!page.contains("<script>"), "inline script in index.html");
        assert!(!page.contains("style="), "inline style in index.html");
        assert!(!page.contains("onclick"), "inline handler in index.html");
        for a in ASSETS {
            for remote in [
                "src=\"http",
                "href=\"http",
                "url(http",
                "from \"http",
                "//cdn",
            ] {
                assert!(
                    !a.body.contains(remote),
                    "{} loads from another origin",
                    a.path
                );
            }
        }
    }
}
