//! The OpenAPI document and its reference page: public, exactly the committed
//! `docs/openapi.json`, every operation routed, real answers that fit the schemas the document
//! gives for them, and a page that renders in a browser under its CSP.

use std::time::Duration;

use flotilla_testkit::{Browser, Fleet, repo_root, wait_until};
use reqwest::{Method, redirect::Policy};
use serde_json::{Value, json};

use crate::{shell, submit, wait};

const KEY: &str = "openapi-test-key-0123456789";

/// What of `value` does not fit `schema`, for the part of JSON Schema the document uses:
/// `$ref`, `type`, `enum`, `oneOf`, `properties`, `required`, `additionalProperties`, `items`.
fn misfits(spec: &Value, schema: &Value, value: &Value, at: &str, out: &mut Vec<String>) {
    if let Some(reference) = schema["$ref"].as_str() {
        let target = spec
            .pointer(reference.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("dangling $ref {reference}"));
        return misfits(spec, target, value, at, out);
    }
    if let Some(variants) = schema["oneOf"].as_array() {
        let fits = variants.iter().any(|variant| {
            let mut errors = Vec::new();
            misfits(spec, variant, value, at, &mut errors);
            errors.is_empty()
        });
        if !fits {
            out.push(format!("{at}: {value} fits no variant of {schema}"));
        }
        return;
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(one) => vec![one.as_str()],
        Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let type_fits = |name: &str| match name {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "string" => value.is_string(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        _ => true,
    };
    if !types.is_empty() && !types.iter().any(|name| type_fits(name)) {
        out.push(format!("{at}: {value} is not {types:?}"));
        return;
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        out.push(format!("{at}: {value} is not one of {allowed:?}"));
    }
    if let Some(object) = value.as_object() {
        for name in schema["required"].as_array().into_iter().flatten() {
            let name = name.as_str().unwrap();
            if !object.contains_key(name) {
                out.push(format!("{at}: required `{name}` is missing"));
            }
        }
        for (name, field) in object {
            let path = format!("{at}.{name}");
            match (&schema["properties"][name], &schema["additionalProperties"]) {
                (Value::Null, Value::Bool(false)) => out.push(format!("{path}: not in the schema")),
                (Value::Null, Value::Null) if schema["properties"].is_object() => {
                    out.push(format!("{path}: not in the schema"));
                }
                (Value::Null, extra) if extra.is_object() => {
                    misfits(spec, extra, field, &path, out)
                }
                (Value::Null, _) => {}
                (property, _) => misfits(spec, property, field, &path, out),
            }
        }
    }
    if let Some(items) = value.as_array() {
        for (i, item) in items.iter().enumerate() {
            misfits(spec, &schema["items"], item, &format!("{at}[{i}]"), out);
        }
    }
}

/// Asserts that `body`, answered `status` by `method path` (the document's path template),
/// fits the JSON schema the document gives for that answer.
pub(crate) fn assert_fits(spec: &Value, method: &str, path: &str, status: u16, body: &Value) {
    let operation = &spec["paths"][path][method];
    assert!(operation.is_object(), "{method} {path} is not documented");
    let mut response = &operation["responses"][status.to_string()];
    if let Some(reference) = response["$ref"].as_str() {
        response = spec.pointer(reference.trim_start_matches('#')).unwrap();
    }
    let schema = &response["content"]["application/json"]["schema"];
    assert!(
        schema.is_object(),
        "{method} {path}: no JSON schema documented for {status}"
    );
    let mut out = Vec::new();
    misfits(spec, schema, body, "$", &mut out);
    assert!(
        out.is_empty(),
        "{method} {path} {status} does not fit its schema:\n{}\nbody: {body:#}",
        out.join("\n")
    );
}

/// The data of each event of a server-sent event stream, by event name.
fn sse_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter_map(|block| {
            let mut name = "message".to_owned();
            let mut data = None;
            for line in block.lines() {
                if let Some(value) = line.strip_prefix("event: ") {
                    name = value.to_owned();
                } else if let Some(value) = line.strip_prefix("data: ") {
                    data = Some(serde_json::from_str(value).unwrap());
                }
            }
            data.map(|data| (name, data))
        })
        .collect()
}

/// The checker itself finds what does not fit (else the test above would prove nothing).
#[test]
fn openapi_schema_checker_finds_misfits() {
    let committed = std::fs::read_to_string(repo_root().join("docs/openapi.json")).unwrap();
    let spec: Value = serde_json::from_str(&committed).unwrap();
    let reply = json!({"$ref": "#/components/schemas/JobStatusReply"});
    let check = |value: Value| {
        let mut out = Vec::new();
        misfits(&spec, &reply, &value, "$", &mut out);
        out
    };
    assert!(check(json!({"job_id": "a-1", "status": "pending"})).is_empty());
    let out = check(json!({"job_id": 1, "status": "done", "extra": true}));
    assert_eq!(out.len(), 3, "{out:?}");
    let out = check(json!({"status": "pending"}));
    assert!(out[0].contains("required `job_id`"), "{out:?}");
    let record = json!({"$ref": "#/components/schemas/JobRecord"});
    let mut out = Vec::new();
    misfits(
        &spec,
        &record,
        &json!({"result": {"text": 5}}),
        "$",
        &mut out,
    );
    assert!(out.iter().any(|e| e.starts_with("$.result")), "{out:?}");
}

#[tokio::test]
async fn openapi_document_is_public_committed_and_fits_the_real_answers() {
    let fleet = Fleet::builder().api_key(KEY).start().await.unwrap();
    let anonymous = reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .unwrap();
    let public = |method: Method, path: &str| {
        anonymous
            .request(method, format!("{}{path}", fleet.api))
            .send()
    };

    // Served without a key, and byte for byte the committed file.
    let response = public(Method::GET, "/openapi.json").await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(response.headers()["x-content-type-options"], "nosniff");
    assert!(response.headers().contains_key("x-request-id"));
    let served = response.text().await.unwrap();
    let committed = std::fs::read_to_string(repo_root().join("docs/openapi.json")).unwrap();
    assert!(
        served == committed,
        "GET /openapi.json differs from docs/openapi.json: rebuild the binaries, or regenerate \
         the file (FLOTILLA_UPDATE_OPENAPI=1 cargo test -p api-gateway openapi)"
    );
    let spec: Value = serde_json::from_str(&served).unwrap();
    assert!(spec["openapi"].as_str().unwrap().starts_with("3."));
    assert_eq!(spec["info"]["title"], "Flotilla");
    assert_eq!(
        spec["components"]["securitySchemes"]["api_key"]["scheme"],
        "bearer"
    );

    // Every documented operation is routed: none answers the fallback's "route not found" or
    // 405. The placeholders name nothing that exists, so nothing changes.
    for (path, item) in spec["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let concrete = path
                .replace("{job_id}", "no-such-job")
                .replace("{type}", "template")
                .replace("{name}", "no-such-file");
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let mut request = fleet
                .request(method.clone(), &concrete)
                .timeout(Duration::from_secs(30));
            if method == Method::POST || method == Method::PUT {
                request = request.json(&json!({}));
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            // An endless event stream (`/jobs/events`) is routed if it started.
            let streaming = response
                .headers()
                .get("content-type")
                .is_some_and(|v| v == "text/event-stream");
            let text = if streaming {
                String::new()
            } else {
                response.text().await.unwrap_or_default()
            };
            assert!(
                status != 405 && !(status == 404 && text.contains("route not found")),
                "{method} {concrete} is documented but not routed: {status} {text}"
            );
        }
    }

    // Real answers fit their documented schemas.
    let get = |path: &str| {
        let request = fleet.request(Method::GET, path);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    let response = fleet
        .request(Method::POST, "/jobs")
        .json(&shell("echo out; echo err >&2"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let accepted: Value = response.json().await.unwrap();
    assert_fits(&spec, "post", "/jobs", 202, &accepted);
    let job_id = accepted["job_id"].as_str().unwrap().to_owned();
    let record = wait(&fleet, &job_id).await;
    assert_eq!(record["status"], "completed", "{record}");
    assert_fits(&spec, "get", "/jobs/{job_id}/wait", 200, &record);
    let second = submit(
        &fleet,
        json!({"agent_id": "e2e", "engine": "shell", "prompt": "true",
        "dry_run": true, "metadata": {"suite": "openapi"}}),
    )
    .await;
    wait(&fleet, &second).await;
    for (path, template) in [
        (format!("/jobs/{job_id}"), "/jobs/{job_id}"),
        (format!("/jobs/{second}"), "/jobs/{job_id}"),
        ("/jobs?limit=10".to_owned(), "/jobs"),
        ("/engines".to_owned(), "/engines"),
        ("/profiles".to_owned(), "/profiles"),
        ("/nodes".to_owned(), "/nodes"),
        ("/health".to_owned(), "/health"),
        ("/configs".to_owned(), "/configs"),
        (
            "/configs/profile/researcher".to_owned(),
            "/configs/{type}/{name}",
        ),
    ] {
        let (status, body) = get(&path).await;
        assert_eq!(status, 200, "{path}: {body}");
        assert_fits(&spec, "get", template, 200, &body);
    }
    let (status, body) = get("/jobs/no-such-job").await;
    assert_eq!(status, 404);
    assert_fits(&spec, "get", "/jobs/{job_id}", 404, &body);
    let (status, body) = get("/jobs?limit=0").await;
    assert_eq!(status, 422);
    assert_fits(&spec, "get", "/jobs", 422, &body);
    let unauthorised = public(Method::GET, "/jobs").await.unwrap();
    assert_eq!(unauthorised.status(), 401);
    assert_fits(
        &spec,
        "get",
        "/jobs",
        401,
        &unauthorised.json().await.unwrap(),
    );
    let conflict = fleet
        .request(Method::DELETE, &format!("/jobs/{job_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(conflict.status(), 409);
    assert_fits(
        &spec,
        "delete",
        "/jobs/{job_id}",
        409,
        &conflict.json().await.unwrap(),
    );

    // A configuration file written and deleted (a template no profile reads loads whatever it
    // holds).
    let written = fleet
        .request(Method::PUT, "/configs/template/openapi-e2e.md.j2")
        .json(&json!({"content": "Hello {{ name }}"}))
        .send()
        .await
        .unwrap();
    assert_eq!(written.status(), 200);
    let body: Value = written.json().await.unwrap();
    assert_fits(&spec, "put", "/configs/{type}/{name}", 200, &body);
    let deleted = fleet
        .request(Method::DELETE, "/configs/template/openapi-e2e.md.j2")
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    let body: Value = deleted.json().await.unwrap();
    assert_fits(&spec, "delete", "/configs/{type}/{name}", 200, &body);

    // The log stream's event data fit `LogEvent` and `EndEvent`.
    let logs = fleet
        .request(Method::GET, &format!("/jobs/{job_id}/logs?follow=false"))
        .send()
        .await
        .unwrap();
    assert_eq!(logs.status(), 200);
    assert_eq!(logs.headers()["content-type"], "text/event-stream");
    let events = sse_events(&logs.text().await.unwrap());
    assert!(events.iter().any(|(name, _)| name == "log"), "{events:?}");
    assert_eq!(events.last().unwrap().0, "end", "{events:?}");
    for (name, data) in &events {
        let schema = match name.as_str() {
            "log" => json!({"$ref": "#/components/schemas/LogEvent"}),
            "end" => json!({"$ref": "#/components/schemas/EndEvent"}),
            other => panic!("unexpected event {other}"),
        };
        let mut out = Vec::new();
        misfits(&spec, &schema, data, name, &mut out);
        assert!(out.is_empty(), "{}", out.join("\n"));
    }
}

#[tokio::test]
async fn openapi_reference_page_is_public_locked_down_and_renders() {
    let fleet = Fleet::builder()
        .nodes(0)
        .api_key(KEY)
        .start()
        .await
        .unwrap();
    let anonymous = reqwest::Client::new();
    let get = |path: &str| anonymous.get(format!("{}{path}", fleet.api)).send();

    for (path, content_type) in [
        ("/docs", "text/html; charset=utf-8"),
        ("/docs/", "text/html; charset=utf-8"),
        ("/docs/docs.js", "text/javascript; charset=utf-8"),
        ("/docs/docs.css", "text/css; charset=utf-8"),
    ] {
        crate::assert_locked_down_asset(get(path).await.unwrap(), path, content_type).await;
    }
    // Unknown files under /docs are 404, not 401.
    assert_eq!(get("/docs/nope.js").await.unwrap().status(), 404);

    // One script, the page's own; no inline style; nothing from another origin.
    let html = get("/docs").await.unwrap().text().await.unwrap();
    assert_eq!(html.matches("<script").count(), 1, "{html}");
    assert!(html.contains(r#"<script src="/docs/docs.js""#), "{html}");
    assert!(html.contains(r#"<link rel="stylesheet" href="/docs/docs.css">"#));
    assert!(!html.contains("style="), "{html}");
    let script = get("/docs/docs.js").await.unwrap().text().await.unwrap();
    for text in [&html, &script] {
        assert!(!text.contains("http://") && !text.contains("https://"));
    }
    // Text from the document goes into the DOM as text, never parsed as HTML.
    for sink in [
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
    ] {
        assert!(!script.contains(sink), "docs.js uses {sink}");
    }

    // In a browser, under that CSP, the page renders the operations and the schemas.
    let browser = Browser::start().await.unwrap();
    browser
        .goto(&format!("{}/docs#op-submit_job", fleet.api))
        .await
        .unwrap();
    let rendered = wait_until(Duration::from_secs(30), "the reference page", || async {
        browser
            .text_of("#op-submit_job")
            .await
            .filter(|text| text.contains("Submit a job"))
    })
    .await;
    let submit_text = match rendered {
        Ok(text) => text,
        Err(e) => {
            let page = browser
                .execute("return document.body.innerText;", Vec::new())
                .await;
            panic!("{e}; the page shows: {page:?}");
        }
    };
    for expected in ["POST", "/jobs", "Idempotency-Key", "202", "422", "API key"] {
        assert!(submit_text.contains(expected), "{expected}: {submit_text}");
    }
    let health = browser.text_of("#op-health").await.unwrap_or_default();
    assert!(health.contains("public"), "{health}");
    let record = browser
        .text_of("#schema-JobRecord")
        .await
        .unwrap_or_default();
    for field in ["job_id", "status", "attempts", "result"] {
        assert!(record.contains(field), "{field}: {record}");
    }
    // An `allOf` (the fields, and the choice of `cron` or `interval_seconds`) shows as one object.
    let schedule = browser
        .text_of("#schema-ScheduleRequest")
        .await
        .unwrap_or_default();
    for field in ["max_runs", "skip_if_running", "timezone", "exactly one of"] {
        assert!(schedule.contains(field), "{field}: {schedule}");
    }
    browser.quit().await.unwrap();
}
