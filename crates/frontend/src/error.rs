//! Every way a request can fail, grouped by what the client can do about it, each mapped
//! to one HTTP status and rendered in OpenAI's error shape
//! `{"error": {"message", "type", "param", "code"}}` so the official clients raise the
//! right exception (`BadRequestError`, `NotFoundError`, `RateLimitError`, ...).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use engine::core::SubmitError;
use serde::Serialize;

/// A request the frontend refuses or cannot finish.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or a parameter is out of range (400); `param` names it.
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
    },
    /// The request names a model this server does not serve (404).
    #[error("the model `{0}` does not exist")]
    ModelNotFound(String),
    /// No route matches the path (404).
    #[error("no route for {method} {path}")]
    RouteNotFound { method: String, path: String },
    /// The route exists but not for this method (405).
    #[error("method {method} is not allowed for {path}")]
    MethodNotAllowed { method: String, path: String },
    /// The body is over the configured limit (413).
    #[error("the request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// The bounded admission queue is full (429); retrying later can succeed.
    #[error("{0}")]
    Overloaded(String),
    /// The model is still loading (503).
    #[error("the model is still loading; retry when GET /health answers 200")]
    NotReady,
    /// The server is draining for shutdown (503).
    #[error("the server is shutting down")]
    ShuttingDown,
    /// No engine instance can serve the request now (503); retrying later can succeed.
    #[error("{0}")]
    Unavailable(String),
    /// A fault of the server or the model, not of the request (500).
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// A 400 naming the parameter at fault.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param: Some(param.into()),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::ModelNotFound(_) | ApiError::RouteNotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Overloaded(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NotReady | ApiError::ShuttingDown | ApiError::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `type` field.
    fn kind(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest { .. }
            | ApiError::ModelNotFound(_)
            | ApiError::RouteNotFound { .. }
            | ApiError::MethodNotAllowed { .. }
            | ApiError::PayloadTooLarge { .. } => "invalid_request_error",
            ApiError::Overloaded(_) => "rate_limit_error",
            ApiError::NotReady | ApiError::ShuttingDown | ApiError::Unavailable(_) => {
                "service_unavailable"
            }
            ApiError::Internal(_) => "server_error",
        }
    }

    /// OpenAI's `code` field: a stable machine-readable reason.
    fn code(&self) -> Option<&'static str> {
        match self {
            ApiError::InvalidRequest { .. } => Some("invalid_parameter"),
            ApiError::ModelNotFound(_) => Some("model_not_found"),
            ApiError::RouteNotFound { .. } => Some("not_found"),
            ApiError::MethodNotAllowed { .. } => Some("method_not_allowed"),
            ApiError::PayloadTooLarge { .. } => Some("request_too_large"),
            ApiError::Overloaded(_) => Some("queue_full"),
            ApiError::NotReady => Some("not_ready"),
            ApiError::ShuttingDown => Some("shutting_down"),
            ApiError::Unavailable(_) => Some("no_instance_available"),
            ApiError::Internal(_) => None,
        }
    }

    fn param(&self) -> Option<&str> {
        match self {
            ApiError::InvalidRequest { param, .. } => param.as_deref(),
            ApiError::ModelNotFound(_) => Some("model"),
            _ => None,
        }
    }

    /// The JSON body, also sent as an SSE `data:` event when a stream fails midway.
    pub fn body(&self) -> ErrorBody<'_> {
        ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                kind: self.kind(),
                param: self.param(),
                code: self.code(),
            },
        }
    }

    /// Renames the parameter of a 400 (the engine says `prompt`; a chat client sent
    /// `messages`).
    pub fn rename_param(self, from: &str, to: &str) -> Self {
        match self {
            ApiError::InvalidRequest {
                message,
                param: Some(p),
            } if p == from => ApiError::InvalidRequest {
                message,
                param: Some(to.to_string()),
            },
            other => other,
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Invalid { param, message } => ApiError::InvalidRequest {
                message,
                param: Some(param),
            },
            e @ SubmitError::QueueFull(_) => ApiError::Overloaded(e.to_string()),
            SubmitError::ShuttingDown => ApiError::ShuttingDown,
            SubmitError::Unavailable(m) => ApiError::Unavailable(m),
        }
    }
}

#[derive(Serialize)]
pub struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    message: String,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<&'a str>,
    code: Option<&'static str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status(), axum::Json(self.body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_matches_openai() {
        let e = ApiError::invalid("temperature", "temperature must be >= 0");
        let v = serde_json::to_value(e.body()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error": {
                "message": "temperature must be >= 0",
                "type": "invalid_request_error",
                "param": "temperature",
                "code": "invalid_parameter",
            }})
        );
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn submit_errors_map_to_statuses() {
        assert_eq!(
            ApiError::from(SubmitError::QueueFull(3)).status(),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            ApiError::from(SubmitError::ShuttingDown).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let e = ApiError::from(SubmitError::invalid("prompt", "too long"))
            .rename_param("prompt", "messages");
        assert_eq!(e.param(), Some("messages"));
    }
}
