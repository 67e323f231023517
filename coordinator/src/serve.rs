//! The HTTP/1.1 server loop: accept, serve each connection on the thread
//! that accepted it, and on shutdown stop accepting and let open
//! connections finish their requests.
//!
//! hyper's HTTP/1 server is used directly rather than through `axum::serve`:
//! every client of an LLM server speaks HTTP/1.1, the version sniffing of
//! the generic server costs a read per connection, and the direct builder
//! exposes the connection settings (read timeouts) that limits need.

use std::time::Duration;

use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Connection settings.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// How long a client may take to send a request head. hyper starts the
    /// clock when it waits for a head, so this also closes connections idle
    /// between requests: a slow or silent client holds a connection no
    /// longer than this.
    pub header_read_timeout: Duration,
}

/// Serves `app` on `listener` until `stop` is cancelled, then waits for the
/// open connections to finish what they are doing.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    options: ServeOptions,
    stop: CancellationToken,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    // Small answers go out as one buffer rather than a vectored write.
    builder.writev(false);
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(options.header_read_timeout);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors, or a connection reset before it
                // was accepted: wait a moment rather than spin.
                tracing::warn!(%error, "Accept failed.");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "Client connection ended with an error.");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
