//! The one table between failure classes, HTTP statuses and each API's error types.
//!
//! Reading an upstream: a status says which [`FailureClass`] a failure is when the provider's
//! error body says nothing more precise ([`class_of_status`]). Writing to an app: a failure
//! with no upstream status to pass on gets the status of its class ([`status_of_class`]), and
//! an error body of either API names the error type its SDK maps that status to
//! ([`openai_error_type`], [`anthropic_error_type`]).

use crate::llm::FailureClass;

/// The class of a failure from its HTTP status alone.
pub fn class_of_status(status: u16) -> FailureClass {
    match status {
        429 => FailureClass::RateLimited,
        402 => FailureClass::QuotaExceeded,
        401 | 403 => FailureClass::AuthError,
        408 => FailureClass::Timeout,
        503 | 529 => FailureClass::Overloaded,
        400..=499 => FailureClass::BadRequest,
        _ => FailureClass::ServerError,
    }
}

/// The status an app gets for a failure of `class` that carries no upstream status to pass on
/// (a timeout, a broken connection, a failure inside a stream, or a chain that ran out).
pub fn status_of_class(class: FailureClass) -> u16 {
    match class {
        FailureClass::RateLimited | FailureClass::QuotaExceeded => 429,
        FailureClass::Overloaded => 503,
        FailureClass::Timeout => 504,
        FailureClass::ContextWindowExceeded | FailureClass::ContentFiltered | FailureClass::BadRequest => 400,
        // The upstream rejected Backstop's key, not the app's: a gateway error to the app.
        FailureClass::AuthError
        | FailureClass::ServerError
        | FailureClass::ConnectError
        | FailureClass::EmptyCompletion => 502,
    }
}

/// The OpenAI error `type` an error body with `status` carries; the OpenAI SDKs pick their
/// exception class by status, and code reading the body by type.
pub fn openai_error_type(status: u16) -> &'static str {
    match status {
        400 | 404 | 405 | 413 | 422 => "invalid_request_error",
        401 | 403 => "authentication_error",
        429 => "rate_limit_error",
        503 => "overloaded_error",
        504 => "timeout",
        _ => "upstream_error",
    }
}

/// The OpenAI error `type` for a failure of `class` with no status of its own (an error event
/// that cuts a committed stream). An upstream's authentication failure is named as such, so
/// it is never mistaken for the app's own key being wrong.
pub fn openai_error_type_of_class(class: FailureClass) -> &'static str {
    match class {
        FailureClass::AuthError => "upstream_authentication_error",
        other => openai_error_type(status_of_class(other)),
    }
}

/// The Anthropic Messages error `type` the Anthropic SDKs map `status` to.
pub fn anthropic_error_type(status: u16) -> &'static str {
    match status {
        400 | 422 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        504 => "timeout_error",
        503 | 529 => "overloaded_error",
        _ => "api_error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_maps_back_to_itself_where_a_status_can_say_it() {
        for class in FailureClass::ALL {
            let status = status_of_class(class);
            let back = class_of_status(status);
            match class {
                // Several classes share a status; a status names the broadest of them.
                FailureClass::QuotaExceeded => assert_eq!(back, FailureClass::RateLimited),
                FailureClass::ContextWindowExceeded | FailureClass::ContentFiltered => {
                    assert_eq!(back, FailureClass::BadRequest)
                }
                // A 504 is a gateway's error, classed as a server error like any 5xx.
                FailureClass::AuthError
                | FailureClass::ConnectError
                | FailureClass::EmptyCompletion
                | FailureClass::Timeout => assert_eq!(back, FailureClass::ServerError),
                _ => assert_eq!(back, class, "{class} -> {status} -> {back}"),
            }
        }
    }

    #[test]
    fn error_types_follow_the_sdks() {
        assert_eq!(class_of_status(529), FailureClass::Overloaded);
        assert_eq!(class_of_status(418), FailureClass::BadRequest);
        assert_eq!(class_of_status(302), FailureClass::ServerError);
        assert_eq!(openai_error_type(429), "rate_limit_error");
        assert_eq!(openai_error_type_of_class(FailureClass::AuthError), "upstream_authentication_error");
        assert_eq!(openai_error_type_of_class(FailureClass::Timeout), "timeout");
        assert_eq!(anthropic_error_type(529), "overloaded_error");
        assert_eq!(anthropic_error_type(status_of_class(FailureClass::Timeout)), "timeout_error");
    }
}
