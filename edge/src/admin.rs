//! The admin listener run as a Pingora background service, so that it lives and stops with the server.
//! The socket is bound in `main` before the server starts, so a taken port fails the start loudly.

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use service_core::admin::{AdminState, serve};
use tokio_util::sync::CancellationToken;

pub struct AdminService {
    pub listener: std::sync::Mutex<Option<std::net::TcpListener>>,
    pub state: AdminState,
}

#[async_trait]
impl BackgroundService for AdminService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(std_listener) = self.listener.lock().ok().and_then(|mut l| l.take()) else {
            return;
        };
        let listener = match tokio::net::TcpListener::from_std(std_listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "admin listener unusable");
                return;
            }
        };
        self.state.readiness.set("proxy", true);
        let token = CancellationToken::new();
        let trigger = token.clone();
        let readiness = self.state.readiness.clone();
        tokio::spawn(async move {
            let _ = shutdown.changed().await;
            // Draining: tell load balancers to stop sending new traffic here.
            readiness.set("proxy", false);
            trigger.cancel();
        });
        serve(listener, self.state.clone(), token).await;
    }
}
