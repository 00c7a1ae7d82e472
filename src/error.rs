//! The crate's request error type and its mapping to HTTP status codes.
//! `Error::status` is the one place where an error becomes a status; the
//! message of each variant is the one-line reason sent to the client.
//! `with_causes` renders any error with its causes on one line.

use hyper::StatusCode;

use crate::name::NameError;
use crate::state::StateError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("X-Content-SHA1 must be 40 hexadecimal digits (one hash if repeated)")]
    BadSha1Header,
    #[error("the body's SHA1 {actual} does not match X-Content-SHA1 {expected}")]
    Sha1Mismatch { expected: String, actual: String },
    #[error("invalid Content-Length")]
    BadContentLength,
    #[error("the request body could not be read: {0}")]
    BodyRead(String),
    #[error("no body data arrived for {} seconds", seconds(.0))]
    ReadTimeout(std::time::Duration),
    #[error("the body is larger than the limit of {0} bytes")]
    TooLarge(u64),
    #[error("the request headers are larger than {0} bytes")]
    HeadersTooLarge(usize),
    #[error("authorization required: send Authorization: Bearer <token>")]
    Unauthorized,
    #[error("method not allowed here; allowed: {0}")]
    MethodNotAllowed(&'static str),
    #[error("not found")]
    NotFound,
    #[error("the name is inside this node's state directory and can never be stored here")]
    InStateDirectory,
    #[error("this name was deleted in the cluster and cannot be stored again")]
    Deleted,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("internal task failed: {0}")]
    Task(String),
}

impl Error {
    /// The HTTP status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::Name(_)
            | Error::BadSha1Header
            | Error::Sha1Mismatch { .. }
            | Error::BadContentLength
            | Error::BodyRead(_)
            | Error::Store(StoreError::ParentNotDir | StoreError::NotAFile) => {
                StatusCode::BAD_REQUEST
            }
            Error::ReadTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Error::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Error::Unauthorized => StatusCode::UNAUTHORIZED,
            Error::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Error::NotFound => StatusCode::NOT_FOUND,
            // 409 like a deleted name: a neighbour sending it accepts the
            // answer instead of retrying for ever.
            Error::Deleted | Error::InStateDirectory => StatusCode::CONFLICT,
            Error::Store(StoreError::DiskFull) => StatusCode::INSUFFICIENT_STORAGE,
            Error::State(e) if e.is_disk_full() => StatusCode::INSUFFICIENT_STORAGE,
            Error::Store(StoreError::Io(_) | StoreError::InUse)
            | Error::State(_)
            | Error::Task(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// A duration as a number of seconds, with its fraction only if it has one.
fn seconds(d: &std::time::Duration) -> String {
    let s = d.as_secs_f64();
    if d.subsec_nanos() == 0 {
        format!("{s:.0}")
    } else {
        format!("{}", (s * 1000.0).round() / 1000.0)
    }
}

/// An error and its causes on one line ("error sending request: ...:
/// Connection refused"), for logs and for `/_status`.
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn client_mistakes_are_4xx_and_faults_5xx() {
        assert_eq!(
            Error::Name(NameError::Empty).status(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(Error::Store(StoreError::DiskFull).status().as_u16(), 507);
        assert_eq!(
            Error::Store(StoreError::ParentNotDir).status().as_u16(),
            400
        );
        assert_eq!(Error::Deleted.status().as_u16(), 409);
        assert_eq!(
            Error::ReadTimeout(Duration::from_secs(1)).status().as_u16(),
            408
        );
        assert!(Error::Task("x".into()).status().is_server_error());
    }

    #[test]
    fn a_timeout_is_said_with_its_fraction() {
        let said = |d| Error::ReadTimeout(d).to_string();
        assert_eq!(
            said(Duration::from_secs(60)),
            "no body data arrived for 60 seconds"
        );
        assert_eq!(
            said(Duration::from_millis(500)),
            "no body data arrived for 0.5 seconds"
        );
        assert_eq!(
            said(Duration::from_millis(1250)),
            "no body data arrived for 1.25 seconds"
        );
    }
}
