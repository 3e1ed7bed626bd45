use std::io;

/// Why a backend could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("could not create the network poller: {0}")]
    Poller(#[source] io::Error),
    #[error("could not watch the {what} for readiness: {source}")]
    Register {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("could not start the network thread: {0}")]
    Thread(#[source] io::Error),
}
