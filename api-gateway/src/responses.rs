//! Answers shared by many operations, documented once and referenced from the handlers'
//! `#[utoipa::path]` attributes by name (`response = Unauthorized`). The handlers own them;
//! `openapi::ApiDoc` only registers them as components.

use utoipa::{
    ToResponse,
    openapi::{
        self, Content, HeaderBuilder, Ref, RefOr, ResponseBuilder,
        schema::{ObjectBuilder, Type},
    },
};

fn error_response(description: &str) -> ResponseBuilder {
    ResponseBuilder::new().description(description).content(
        "application/json",
        Content::new(Some(Ref::from_schema_name("ErrorBody"))),
    )
}

fn integer_header(description: &str) -> openapi::Header {
    HeaderBuilder::new()
        .schema(ObjectBuilder::new().schema_type(Type::Integer))
        .description(Some(description))
        .build()
}

fn string_header(description: &str) -> openapi::Header {
    HeaderBuilder::new()
        .schema(ObjectBuilder::new().schema_type(Type::String))
        .description(Some(description))
        .build()
}

/// 401 `unauthorized`.
pub struct Unauthorized;

impl<'r> ToResponse<'r> for Unauthorized {
    fn response() -> (&'r str, RefOr<openapi::Response>) {
        let response = error_response(
            "`unauthorized`: the gateway has an API key, and the request did not send it as \
             `Authorization: Bearer <key>`.",
        )
        .header("WWW-Authenticate", string_header("`Bearer`"))
        .build();
        ("Unauthorized", response.into())
    }
}

/// 403 `forbidden_host` or `cross_site`: only when the gateway has no API key.
pub struct Keyless;

impl<'r> ToResponse<'r> for Keyless {
    fn response() -> (&'r str, RefOr<openapi::Response>) {
        let response = error_response(
            "Only when the gateway has no API key: `forbidden_host` (the `Host` is not \
             `localhost`, `127.x.x.x` or `[::1]`, and `FLOTILLA_ALLOW_UNAUTHENTICATED_PUBLIC` is \
             not set) or `cross_site` (`Sec-Fetch-Site` is `cross-site` or `same-site`, or \
             `Origin` names another host).",
        )
        .build();
        ("Keyless", response.into())
    }
}

/// 403 on the operations that change the configuration (`middleware::needs_admin`): `forbidden`
/// for the API key when an admin key is set, or what [`Keyless`] says without any key. One
/// response per status, so it says both.
pub struct AdminOnly;

impl<'r> ToResponse<'r> for AdminOnly {
    fn response() -> (&'r str, RefOr<openapi::Response>) {
        let response = error_response(
            "`forbidden`: the gateway has an admin key (`FLOTILLA_ADMIN_API_KEY`), which alone \
             may change the configuration, and the request sent the ordinary API key (which \
             still reads it). Or, only when the gateway has no API key, `forbidden_host` or \
             `cross_site`, as for every operation.",
        )
        .build();
        ("AdminOnly", response.into())
    }
}

/// 415 `unsupported_media_type`: only when the gateway has no API key.
pub struct NotJson;

impl<'r> ToResponse<'r> for NotJson {
    fn response() -> (&'r str, RefOr<openapi::Response>) {
        let response = error_response(
            "`unsupported_media_type`: only when the gateway has no API key, a body must be \
             sent with `Content-Type: application/json`.",
        )
        .build();
        ("NotJson", response.into())
    }
}

/// 404 for an unknown job id.
pub struct NotFoundJob;

impl<'r> ToResponse<'r> for NotFoundJob {
    fn response() -> (&'r str, RefOr<openapi::Response>) {
        let response = error_response(
            "`not_found`: no such job, including ids that do not match `^[A-Za-z0-9_-]{1,128}$` \
             and jobs deleted by retention.",
        )
        .build();
        ("NotFoundJob", response.into())
    }
}

/// 404 for an unknown schedule id.
pub struct NotFoundSchedule;

impl<'r> ToResponse<'r> for NotFoundSchedule {
    fn response() -> (&'r str, RefOr<openapi::Response>) {
        let response = error_response(
            "`not_found`: no such schedule, including ids that do not match \
             `^[A-Za-z0-9_-]{1,64}$`.",
        )
        .build();
        ("NotFoundSchedule", response.into())
    }
}

/// 500 `internal`.
pub struct Internal;

impl<'r> ToResponse<'r> for Internal {
    fn response() -> (&'r str, RefOr<openapi::Response>) {
        let response =
            error_response("`internal`: an unexpected error; the cause is logged, not returned.")
                .build();
        ("Internal", response.into())
    }
}

/// 503 `unavailable`.
pub struct Unavailable;

impl<'r> ToResponse<'r> for Unavailable {
    fn response() -> (&'r str, RefOr<openapi::Response>) {
        let response = error_response("`unavailable`: NATS or its KV store cannot be reached.")
            .header("Retry-After", integer_header("Seconds to wait: 1."))
            .build();
        ("Unavailable", response.into())
    }
}
