//! The one error type of the library. Each variant maps onto one C result
//! code (`pcclResult_t`, see [`Error::code`]) and carries a human-readable cause.

/// Library error; variants correspond one-to-one to `pcclResult_t` codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("not initialized: {0}")]
    NotInitialized(String),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("invalid usage: {0}")]
    InvalidUsage(String),
    #[error("too few peers: {0}")]
    TooFewPeers(String),
    #[error("master connection failed: {0}")]
    MasterConnectionFailed(String),
    #[error("rank connection failed: {0}")]
    RankConnectionFailed(String),
    #[error("rank connection lost: {0}")]
    RankConnectionLost(String),
    /// An in-place all-reduce failed after it had overwritten part of its
    /// buffer, with restore-on-failure off: the input is gone, so the op
    /// must not be retried. Reported to C as `pcclRankConnectionLost`.
    #[error("rank connection lost, in-place input lost: {0}")]
    InPlaceInputLost(String),
    #[error("no shared state available: {0}")]
    NoSharedStateAvailable(String),
    #[error("pending async ops: {0}")]
    PendingAsyncOps(String),
    #[error("update topology failed: {0}")]
    UpdateTopologyFailed(String),
    #[error("topology optimization failed: {0}")]
    TopologyOptimizationFailed(String),
}

impl Error {
    /// The matching `pcclResult_t` value.
    pub const fn code(&self) -> i32 {
        match self {
            Error::NotInitialized(_) => 1,
            Error::Internal(_) => 2,
            Error::InvalidArgument(_) => 3,
            Error::InvalidUsage(_) => 4,
            Error::TooFewPeers(_) => 5,
            Error::MasterConnectionFailed(_) => 6,
            Error::RankConnectionFailed(_) => 7,
            Error::RankConnectionLost(_) | Error::InPlaceInputLost(_) => 8,
            Error::NoSharedStateAvailable(_) => 9,
            Error::PendingAsyncOps(_) => 10,
            Error::UpdateTopologyFailed(_) => 11,
            Error::TopologyOptimizationFailed(_) => 12,
        }
    }

    /// The variant of a `pcclResult_t` value (as [`Error::code`] gives it),
    /// carrying `reason`; any code without a variant (0 included: success is
    /// not an error) becomes `Internal`.
    pub fn from_code(code: i32, reason: String) -> Error {
        match code {
            1 => Error::NotInitialized(reason),
            3 => Error::InvalidArgument(reason),
            4 => Error::InvalidUsage(reason),
            5 => Error::TooFewPeers(reason),
            6 => Error::MasterConnectionFailed(reason),
            7 => Error::RankConnectionFailed(reason),
            8 => Error::RankConnectionLost(reason),
            9 => Error::NoSharedStateAvailable(reason),
            10 => Error::PendingAsyncOps(reason),
            11 => Error::UpdateTopologyFailed(reason),
            12 => Error::TopologyOptimizationFailed(reason),
            _ => Error::Internal(reason),
        }
    }

    /// The cause without the category prefix.
    pub fn message(&self) -> &str {
        match self {
            Error::NotInitialized(m)
            | Error::Internal(m)
            | Error::InvalidArgument(m)
            | Error::InvalidUsage(m)
            | Error::TooFewPeers(m)
            | Error::MasterConnectionFailed(m)
            | Error::RankConnectionFailed(m)
            | Error::RankConnectionLost(m)
            | Error::InPlaceInputLost(m)
            | Error::NoSharedStateAvailable(m)
            | Error::PendingAsyncOps(m)
            | Error::UpdateTopologyFailed(m)
            | Error::TopologyOptimizationFailed(m) => m,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for code in 1..=12 {
            let e = Error::from_code(code, format!("cause {code}"));
            assert_eq!(e.code(), code);
            assert_eq!(e.message(), format!("cause {code}"));
        }
        for code in [0, 13, 255, -1] {
            assert!(matches!(
                Error::from_code(code, String::new()),
                Error::Internal(_)
            ));
        }
    }
}
