// Flotilla API reference: renders this gateway's OpenAPI document (/openapi.json) as a
// browsable page: operations grouped by tag with their parameters, bodies and answers, then the
// schemas. Vanilla JS, no dependencies, nothing fetched from elsewhere. Text from the document
// reaches the DOM through text nodes only, never as HTML (the CSP forbids inline script and
// style, so the page builds its DOM with textContent and classes).
"use strict";

const METHODS = ["get", "put", "post", "delete", "patch", "head", "options", "trace"];
/** Nested schemas are expanded up to this depth; deeper ones are links to the schema list. */
const MAX_DEPTH = 6;

let spec = null;

// ---------------------------------------------------------------------------------------------
// DOM helpers

/** Nodes and strings from arbitrarily nested arrays; null, undefined and false are skipped. */
function nodes(...children) {
  return children.flat(Infinity)
    .filter((child) => child !== null && child !== undefined && child !== false)
    .map((child) => (child instanceof Node ? child : String(child)));
}

/** `h("td", {class: "num"}, "text", childNode, [more])`. Attribute names are always literals. */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  el.append(...nodes(children));
  return el;
}

/** Text with `code` spans. */
function inline(text) {
  const parts = String(text).split("`");
  return parts.map((part, i) => (i % 2 === 1 ? h("code", {}, part) : part));
}

/** The small Markdown subset the document's descriptions use: paragraphs, "- " lists, `code`. */
function markdown(text, cls) {
  const box = h("div", { class: cls ? `md ${cls}` : "md" });
  if (!text) return box;
  for (const block of String(text).split(/\n\s*\n/)) {
    const lines = block.split("\n");
    if (/^\s*- /.test(lines[0])) {
      const list = h("ul");
      let item = null;
      for (const line of lines) {
        if (/^\s*- /.test(line)) {
          item = h("li", {}, inline(line.replace(/^\s*- /, "")));
          list.append(item);
        } else if (item) {
          item.append(...nodes(" ", inline(line.trim())));
        }
      }
      box.append(list);
    } else {
      box.append(h("p", {}, inline(lines.map((line) => line.trim()).join(" "))));
    }
  }
  return box;
}

function slug(text) {
  return String(text).replace(/[^A-Za-z0-9_-]+/g, "-");
}

function opId(method, path, op) {
  return `op-${slug(op.operationId || `${method}-${path}`)}`;
}

function example(value) {
  const text = typeof value === "string" ? value : JSON.stringify(value, null, 2);
  return h("pre", { class: "example" }, text);
}

// ---------------------------------------------------------------------------------------------
// Schemas

function refName(ref) {
  return decodeURIComponent(String(ref).split("/").pop());
}

/** The schema a `$ref` points at (schemas only; responses are resolved by `responseOf`), its
 *  `allOf` parts merged. */
function resolve(schema) {
  let target = schema || {};
  if (target.$ref) target = (spec.components?.schemas || {})[refName(target.$ref)] || {};
  return target.allOf ? merged(target) : target;
}

/** An `allOf` shown as one object: its parts' fields together. A part that only constrains
 *  (ScheduleRequest's `oneOf` of `cron` and `interval_seconds`) adds no field; the schema's
 *  description states it. */
function merged(schema) {
  const out = { ...schema, allOf: undefined, properties: {}, required: [] };
  for (const part of schema.allOf.map(resolve)) {
    Object.assign(out.properties, part.properties || {});
    out.required.push(...(part.required || []));
    if (part.additionalProperties === false) out.additionalProperties = false;
    if (part.type && !out.type) out.type = part.type;
  }
  return out;
}

/** `oneOf: [{type: "null"}, X]` (utoipa's nullable reference) as X plus a null flag. */
function splitNullable(schema) {
  const variants = schema.oneOf || schema.anyOf;
  if (variants && variants.length === 2) {
    const other = variants.filter((v) => v.type !== "null");
    if (other.length === 1) return { schema: other[0], nullable: true };
  }
  return { schema, nullable: false };
}

function schemaLink(name) {
  return h("a", { href: `#schema-${slug(name)}`, class: "schema-link" }, name);
}

/** A short type description: `string (date-time)`, `array of Attempt`, `JobStatus | null`... */
function typeLabel(raw) {
  const { schema, nullable } = splitNullable(raw || {});
  const parts = [];
  if (schema.$ref) {
    parts.push(schemaLink(refName(schema.$ref)));
  } else if (schema.oneOf || schema.anyOf) {
    const variants = schema.oneOf || schema.anyOf;
    variants.forEach((v, i) => { if (i) parts.push(" | "); parts.push(...typeLabel(v)); });
  } else if (schema.allOf) {
    parts.push(...typeLabel(merged(schema)));
  } else {
    const types = Array.isArray(schema.type) ? schema.type : schema.type ? [schema.type] : [];
    const main = types.filter((t) => t !== "null");
    if (main.length === 0 && !schema.properties && !schema.additionalProperties) {
      parts.push(types.includes("null") ? "null" : "any");
    }
    main.forEach((t, i) => {
      if (i) parts.push(" | ");
      if (t === "array") {
        parts.push("array of ", ...typeLabel(schema.items || {}));
      } else if (t === "object" && schema.additionalProperties && !schema.properties) {
        parts.push("map of string → ", ...(schema.additionalProperties === true ? ["any"] : typeLabel(schema.additionalProperties)));
      } else {
        parts.push(schema.format ? `${t} (${schema.format})` : t);
      }
    });
    if (types.includes("null") && main.length) parts.push(" | null");
  }
  if (nullable) parts.push(" | null");
  return parts;
}

/** Rules worth showing next to a field: enum, bounds, pattern, default, example. */
function constraints(raw) {
  const schema = resolve(splitNullable(raw || {}).schema);
  const out = [];
  if (schema.enum) out.push(h("span", { class: "rule" }, "one of: ", schema.enum.map((v, i) => [i ? ", " : "", h("code", {}, JSON.stringify(v))])));
  const bound = (name, label) => {
    if (schema[name] !== undefined) out.push(h("span", { class: "rule" }, `${label} ${schema[name]}`));
  };
  bound("minimum", "≥");
  bound("exclusiveMinimum", ">");
  bound("maximum", "≤");
  bound("exclusiveMaximum", "<");
  bound("minLength", "length ≥");
  bound("maxLength", "length ≤");
  if (schema.pattern) out.push(h("span", { class: "rule" }, "pattern ", h("code", {}, schema.pattern)));
  if (schema.default !== undefined) out.push(h("span", { class: "rule" }, "default ", h("code", {}, JSON.stringify(schema.default))));
  if (raw && raw.example !== undefined && typeof raw.example !== "object") {
    out.push(h("span", { class: "rule" }, "e.g. ", h("code", {}, JSON.stringify(raw.example))));
  }
  return out;
}

/** The object (after refs, nullability) whose properties a field would expand to, if any. */
function expandable(raw) {
  let { schema } = splitNullable(raw || {});
  schema = resolve(schema);
  const types = Array.isArray(schema.type) ? schema.type : [schema.type];
  if (types.includes("array")) return expandable(schema.items);
  if (schema.additionalProperties && typeof schema.additionalProperties === "object" && !schema.properties) {
    return expandable(schema.additionalProperties);
  }
  return schema.properties ? schema : null;
}

/** A field's description: its own, else its nullable variant's, else its referenced schema's. */
function describe(prop) {
  if (prop.description) return prop.description;
  const inner = splitNullable(prop).schema;
  return inner.description || resolve(inner).description || null;
}

/** The properties of an object schema, each with its type, rules and description; nested
 *  objects expand in place (closed), up to MAX_DEPTH and never into themselves. */
function propertiesList(schema, depth, seen) {
  const props = schema.properties || {};
  const required = new Set(schema.required || []);
  const list = h("ul", { class: "props" });
  for (const [name, prop] of Object.entries(props)) {
    const row = h("li", {},
      h("div", { class: "prop-head" },
        h("code", { class: "prop-name" }, name),
        required.has(name) ? h("span", { class: "required" }, "required") : null,
        h("span", { class: "type" }, typeLabel(prop)),
        constraints(prop)),
      describe(prop) ? markdown(describe(prop), "prop-desc") : null);
    const nested = expandable(prop);
    const ref = splitNullable(prop).schema.$ref || (prop.items && prop.items.$ref) || null;
    if (nested && depth < MAX_DEPTH && !(ref && seen.has(ref))) {
      const nextSeen = new Set(seen);
      if (ref) nextSeen.add(ref);
      row.append(h("details", { class: "nested" },
        h("summary", {}, "fields"),
        schemaBody(nested, depth + 1, nextSeen)));
    }
    list.append(row);
  }
  return list;
}

/** A schema's content: object properties, map values, array items, enum or scalar type. */
function schemaBody(raw, depth, seen) {
  const schema = resolve(splitNullable(raw || {}).schema);
  const box = h("div", { class: "schema" });
  if (schema.properties) {
    box.append(propertiesList(schema, depth, seen));
    if (schema.additionalProperties === false) box.append(h("p", { class: "muted small" }, "No other fields are accepted."));
  } else {
    box.append(h("p", { class: "type-line" }, h("span", { class: "type" }, typeLabel(raw)), " ", constraints(raw)));
    const nested = expandable(raw);
    if (nested && depth < MAX_DEPTH) box.append(propertiesList(nested, depth + 1, seen));
  }
  return box;
}

/** A body's schema: its name (linked) when it is a reference, then its fields. */
function schemaBlock(raw) {
  const ref = raw && raw.$ref;
  const seen = new Set(ref ? [ref] : []);
  return h("div", { class: "schema-block" },
    ref ? h("div", { class: "schema-name" }, "schema ", schemaLink(refName(ref))) : null,
    schemaBody(raw, 0, seen));
}

// ---------------------------------------------------------------------------------------------
// Operations

function responseOf(response) {
  if (response && response.$ref) {
    const name = refName(response.$ref);
    return { name, response: (spec.components?.responses || {})[name] || {} };
  }
  return { name: null, response: response || {} };
}

function contentBlocks(content) {
  return Object.entries(content || {}).map(([type, media]) => h("div", { class: "media" },
    h("div", { class: "media-type" }, h("code", {}, type)),
    media.schema ? schemaBlock(media.schema) : null,
    media.example !== undefined ? [h("div", { class: "label" }, "Example"), example(media.example)] : null,
    Object.entries(media.examples || {}).map(([name, ex]) => [h("div", { class: "label" }, `Example: ${name}`), example(ex.value)])));
}

function parametersTable(params) {
  return h("table", { class: "params" },
    h("thead", {}, h("tr", {}, h("th", {}, "Name"), h("th", {}, "In"), h("th", {}, "Type"), h("th", {}, "Description"))),
    h("tbody", {}, params.map((p) => h("tr", {},
      h("td", {}, h("code", {}, p.name), p.required ? h("span", { class: "required" }, "required") : null),
      h("td", {}, p.in),
      h("td", {}, h("span", { class: "type" }, typeLabel(p.schema || {})), " ", constraints(p.schema || {})),
      h("td", {}, p.description ? markdown(p.description) : null)))));
}

function responsesList(responses) {
  return h("div", { class: "responses" }, Object.entries(responses || {}).map(([status, raw]) => {
    const { name, response } = responseOf(raw);
    const kind = status[0] === "2" ? "ok" : status[0] === "3" ? "redirect" : "error";
    const headers = Object.entries(response.headers || {});
    return h("details", { class: `response ${kind}`, open: kind !== "error" },
      h("summary", {},
        h("span", { class: `code ${kind}` }, status),
        name ? h("span", { class: "muted" }, `${name}: `) : null,
        inline((response.description || "").split("\n")[0])),
      headers.length ? h("div", { class: "headers" }, h("div", { class: "label" }, "Headers"),
        h("ul", { class: "props" }, headers.map(([hname, header]) => h("li", {},
          h("div", { class: "prop-head" }, h("code", { class: "prop-name" }, hname),
            h("span", { class: "type" }, typeLabel(header.schema || {}))),
          header.description ? markdown(header.description, "prop-desc") : null)))) : null,
      contentBlocks(response.content));
  }));
}

function operationSection(method, path, op) {
  const secured = Array.isArray(op.security) && op.security.some((req) => Object.keys(req).length > 0);
  const params = op.parameters || [];
  const body = op.requestBody;
  return h("section", {
    class: "operation",
    id: opId(method, path, op),
    "data-search": `${method} ${path} ${op.summary || ""} ${op.operationId || ""}`.toLowerCase(),
  },
  h("h3", {},
    h("span", { class: `method ${method}` }, method.toUpperCase()),
    h("code", { class: "path" }, path),
    h("span", { class: secured ? "auth key" : "auth public" }, secured ? "API key" : "public")),
  op.summary ? h("p", { class: "summary" }, inline(op.summary)) : null,
  op.description ? markdown(op.description) : null,
  params.length ? [h("h4", {}, "Parameters"), parametersTable(params)] : null,
  body ? [h("h4", {}, "Request body", body.required ? h("span", { class: "required" }, "required") : null),
    body.description ? markdown(body.description) : null,
    contentBlocks(body.content)] : null,
  h("h4", {}, "Responses"),
  responsesList(op.responses));
}

/** Operations by tag, in the document's tag order; untagged ones last. */
function groupByTag() {
  const groups = new Map((spec.tags || []).map((tag) => [tag.name, { tag, operations: [] }]));
  for (const [path, item] of Object.entries(spec.paths || {})) {
    for (const method of METHODS) {
      const op = item[method];
      if (!op) continue;
      const name = (op.tags && op.tags[0]) || "other";
      if (!groups.has(name)) groups.set(name, { tag: { name }, operations: [] });
      groups.get(name).operations.push({ method, path, op });
    }
  }
  return [...groups.values()].filter((group) => group.operations.length);
}

// ---------------------------------------------------------------------------------------------
// Page

/** A schema's example: `example`, or the first of `examples` (OpenAPI 3.1). */
function schemaExamples(schema) {
  const value = schema.example !== undefined ? schema.example : (schema.examples || [])[0];
  return value !== undefined ? [h("div", { class: "label" }, "Example"), example(value)] : null;
}

function render() {
  const info = spec.info || {};
  document.title = `${info.title || "API"} API reference`;
  document.getElementById("version").textContent = `v${info.version || "?"} · OpenAPI ${spec.openapi || "?"}`;
  const content = document.getElementById("content");
  const toc = document.getElementById("toc");
  const groups = groupByTag();
  const schemas = Object.entries(spec.components?.schemas || {});
  const schemes = Object.entries(spec.components?.securitySchemes || {});

  toc.replaceChildren(...nodes(
    groups.map(({ tag, operations }) => h("div", { class: "toc-group" },
      h("a", { class: "toc-tag", href: `#tag-${slug(tag.name)}` }, tag.name),
      h("ul", {}, operations.map(({ method, path, op }) => h("li", { "data-op": opId(method, path, op) },
        h("a", { href: `#${opId(method, path, op)}` },
          h("span", { class: `method small ${method}` }, method.toUpperCase()), " ", path)))))),
    h("div", { class: "toc-group" },
      h("a", { class: "toc-tag", href: "#schemas" }, "schemas"),
      h("ul", {}, schemas.map(([name]) => h("li", {}, h("a", { href: `#schema-${slug(name)}` }, name)))))));

  content.replaceChildren(...nodes(
    h("section", { class: "intro" },
      h("h1", {}, info.title || "API", " ", h("span", { class: "muted" }, info.version || "")),
      markdown(info.description),
      schemes.length ? h("div", { class: "panel" }, h("h4", {}, "Authentication"),
        schemes.map(([name, scheme]) => h("div", {},
          h("code", {}, name), ` (${scheme.type}${scheme.scheme ? `, ${scheme.scheme}` : ""}): `,
          scheme.description ? inline(scheme.description) : null))) : null),
    groups.map(({ tag, operations }) => h("section", { class: "tag", id: `tag-${slug(tag.name)}` },
      h("h2", {}, tag.name),
      tag.description ? markdown(tag.description, "muted") : null,
      operations.map(({ method, path, op }) => operationSection(method, path, op)))),
    h("section", { class: "tag", id: "schemas" },
      h("h2", {}, "Schemas"),
      schemas.map(([name, schema]) => h("section", { class: "operation schema-def", id: `schema-${slug(name)}` },
        h("h3", {}, h("code", {}, name), " ", h("span", { class: "type" }, typeLabel(schema))),
        schema.description ? markdown(schema.description) : null,
        schemaBody(schema, 0, new Set([`#/components/schemas/${name}`])),
        schemaExamples(schema))))));

  // The browser looked for the fragment before the page existed.
  if (location.hash.length > 1) {
    const target = document.getElementById(decodeURIComponent(location.hash.slice(1)));
    if (target) target.scrollIntoView();
  }
}

/** Hides the operations (and their contents entries) that do not contain the filter text. */
function applyFilter(text) {
  const needle = text.trim().toLowerCase();
  for (const section of document.querySelectorAll("section.operation[data-search]")) {
    const visible = !needle || section.dataset.search.includes(needle);
    section.hidden = !visible;
    const entry = document.querySelector(`#toc li[data-op="${section.id}"]`);
    if (entry) entry.hidden = !visible;
  }
  for (const tag of document.querySelectorAll("section.tag")) {
    if (tag.id === "schemas") continue;
    tag.hidden = !tag.querySelector("section.operation:not([hidden])");
  }
}

async function main() {
  const content = document.getElementById("content");
  try {
    const response = await fetch("/openapi.json", { headers: { Accept: "application/json" } });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    spec = await response.json();
  } catch (error) {
    content.replaceChildren(h("p", { class: "error" }, `Cannot load /openapi.json: ${error.message}`));
    return;
  }
  render();
  document.getElementById("filter").addEventListener("input", (event) => applyFilter(event.target.value));
}

main();
