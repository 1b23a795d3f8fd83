//! Chat templates: the Jinja program in `tokenizer_config.json` that turns a list of messages
//! into the prompt text, rendered with `minijinja` configured the way transformers'
//! `apply_chat_template` configures Jinja2 (trim_blocks, lstrip_blocks, Python string
//! methods, `raise_exception`, a Python-compatible `tojson`, `strftime_now`), so the prompt
//! text matches byte for byte.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

const TEMPLATE_NAME: &str = "chat";

/// What can go wrong with a chat template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatTemplateError {
    /// The model ships no template.
    #[error("the model has no chat template")]
    Missing,
    /// The template itself is broken: a model problem, not the request's.
    #[error("the chat template does not compile: {0}")]
    Syntax(String),
    /// The template rejected the conversation through `raise_exception`: the request's fault.
    #[error("{0}")]
    Rejected(String),
    /// Rendering failed for another reason (e.g. a message lacks a field the template uses).
    #[error("cannot render the chat template: {0}")]
    Render(String),
}

/// One chat message with plain-text content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Variables beyond the messages.
#[derive(Clone, Debug, Default)]
pub struct ChatOptions {
    /// Open an assistant turn at the end, for the model to complete.
    pub add_generation_prompt: bool,
    /// Extra template variables (`tools`, `documents`, `enable_thinking`, …); they override
    /// the defaults of the same name.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// The error `raise_exception` attaches, found again in the error's source chain.
#[derive(Debug)]
struct Raised(String);

impl fmt::Display for Raised {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

/// A compiled chat template, cheap to share across requests.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Arc<Environment<'static>>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    pub fn new(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, ChatTemplateError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| ChatTemplateError::Syntax(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, _> {
            Err(
                minijinja::Error::new(ErrorKind::InvalidOperation, "raise_exception")
                    .with_source(Raised(msg)),
            )
        });
        env.add_function("strftime_now", |format: String| strftime_utc_now(&format));
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| ChatTemplateError::Syntax(describe(&e)))?;
        Ok(ChatTemplate {
            env: Arc::new(env),
            bos_token,
            eos_token,
        })
    }

    /// Renders plain-text messages.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        options: &ChatOptions,
    ) -> Result<String, ChatTemplateError> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from(BTreeMap::from([
                    ("role", Value::from(m.role.as_str())),
                    ("content", Value::from(m.content.as_str())),
                ]))
            })
            .collect();
        self.render_values(Value::from(messages), options)
    }

    /// Renders messages given as JSON (an array of objects), for structured content such as
    /// tool calls or content parts.
    pub fn render_json(
        &self,
        messages: &serde_json::Value,
        options: &ChatOptions,
    ) -> Result<String, ChatTemplateError> {
        if !messages.is_array() {
            return Err(ChatTemplateError::Render(
                "messages must be a JSON array".into(),
            ));
        }
        self.render_values(json_to_value(messages), options)
    }

    fn render_values(
        &self,
        messages: Value,
        options: &ChatOptions,
    ) -> Result<String, ChatTemplateError> {
        let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
        ctx.insert("messages".into(), messages);
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(options.add_generation_prompt),
        );
        ctx.insert("bos_token".into(), Value::from(self.bos_token.clone()));
        ctx.insert("eos_token".into(), Value::from(self.eos_token.clone()));
        for (k, v) in &options.extra {
            ctx.insert(k.clone(), json_to_value(v));
        }
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ChatTemplateError::Syntax(describe(&e)))?;
        template
            .render(Value::from(ctx))
            .map_err(|e| match raised_message(&e) {
                Some(msg) => ChatTemplateError::Rejected(msg),
                None => ChatTemplateError::Render(describe(&e)),
            })
    }
}

fn raised_message(e: &minijinja::Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(Raised(msg)) = err.downcast_ref::<Raised>() {
            return Some(msg.clone());
        }
        source = err.source();
    }
    None
}

/// The error with its template line, when known.
fn describe(e: &minijinja::Error) -> String {
    match e.line() {
        Some(line) => format!("{e} (line {line})"),
        None => e.to_string(),
    }
}

fn json_to_value(v: &serde_json::Value) -> Value {
    use serde_json::Value as J;
    match v {
        J::Null => Value::from(()),
        J::Bool(b) => Value::from(*b),
        J::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        J::String(s) => Value::from(s.as_str()),
        J::Array(a) => Value::from(a.iter().map(json_to_value).collect::<Vec<_>>()),
        J::Object(o) => Value::from(
            o.iter()
                .map(|(k, v)| (k.clone(), json_to_value(v)))
                .collect::<BTreeMap<_, _>>(),
        ),
    }
}

/// `tojson` as transformers defines it: Python's `json.dumps(x, ensure_ascii=False,
/// indent=indent, sort_keys=sort_keys)`, i.e. `", "` and `": "` separators and no HTML
/// escaping (minijinja's built-in escapes `<`, `>`, `&` and `'`, which changes prompts).
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    // Accepted for compatibility; non-ASCII is always written as is.
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_py_json(value, indent, sort_keys.unwrap_or(false), 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn write_py_json(
    value: &Value,
    indent: Option<usize>,
    sort_keys: bool,
    depth: usize,
    out: &mut String,
) -> Result<(), minijinja::Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number if value.is_integer() => out.push_str(&value.to_string()),
        ValueKind::Number => out.push_str(&py_float(f64::try_from(value.clone())?)),
        ValueKind::String => write_py_str(value.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_py_json(item, indent, sort_keys, depth + 1, out)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if sort_keys {
                keys.sort();
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_py_str(&key.to_string(), out);
                out.push_str(": ");
                write_py_json(&value.get_item(key)?, indent, sort_keys, depth + 1, out)?;
            }
            newline(out, depth);
            out.push('}');
        }
        _ => write_py_str(&value.to_string(), out),
    }
    Ok(())
}

/// Python's `repr(float)`: `1.0`, `0.5`, `1e-05`, `1e+16`.
fn py_float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let abs = x.abs();
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        let s = format!("{x:e}");
        match s.split_once('e') {
            Some((mantissa, exp)) => {
                let (sign, digits) = match exp.strip_prefix('-') {
                    Some(d) => ('-', d),
                    None => ('+', exp),
                };
                format!("{mantissa}e{sign}{digits:0>2}")
            }
            None => s,
        }
    } else {
        format!("{x:?}")
    }
}

fn write_py_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `strftime_now(format)` as transformers provides it, in UTC. Supports the directives chat
/// templates use (`%Y %m %d %e %H %M %S %b %B %a %A %y %j %%`); others pass through.
fn strftime_utc_now(format: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    strftime_utc(format, secs)
}

fn strftime_utc(format: &str, unix_secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday.
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('j') => out.push_str(&format!("{day_of_year:03}")),
            Some('H') => out.push_str(&format!("{:02}", secs_of_day / 3600)),
            Some('M') => out.push_str(&format!("{:02}", secs_of_day / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs_of_day % 60)),
            Some('B') => out.push_str(MONTHS[month as usize - 1]),
            Some('b') => out.push_str(&MONTHS[month as usize - 1][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month, day); Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A Zephyr-style template, written for these tests in the shape many HF models use.
    const ZEPHYR_STYLE: &str = "{% for message in messages %}\n\
        {% if message['role'] == 'user' %}\n\
        {{ '<|user|>\\n' + message['content'] + eos_token }}\n\
        {% elif message['role'] == 'system' %}\n\
        {{ '<|system|>\\n' + message['content'] + eos_token }}\n\
        {% elif message['role'] == 'assistant' %}\n\
        {{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n\
        {% endif %}\n\
        {% if loop.last and add_generation_prompt %}\n\
        {{ '<|assistant|>' }}\n\
        {% endif %}\n\
        {% endfor %}";

    /// A Llama 3.1-style template with tools, tojson, strftime_now and Python string methods.
    const TOOLS_STYLE: &str = r#"{{- bos_token }}
{%- set date_string = strftime_now("%d %b %Y") %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'].strip() %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{{- "Today Date: " + date_string + "\n" }}
{%- if tools is defined and tools is not none %}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message.role.startswith('sys') %}
        {{- raise_exception("System message must be first, got one at position " ~ loop.index0) }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"#;

    fn msgs(pairs: &[(&str, &str)]) -> Vec<ChatMessage> {
        pairs
            .iter()
            .map(|(r, c)| ChatMessage::new(*r, *c))
            .collect()
    }

    #[test]
    fn renders_zephyr_style_with_trim_blocks() {
        let t = ChatTemplate::new(ZEPHYR_STYLE, Some("<s>".into()), Some("</s>".into())).unwrap();
        let opts = ChatOptions {
            add_generation_prompt: true,
            ..Default::default()
        };
        let out = t
            .render(&msgs(&[("system", "Be brief."), ("user", "Hi")]), &opts)
            .unwrap();
        // trim_blocks eats the newline after each block tag; the ones after `}}` remain.
        assert_eq!(
            out,
            "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"
        );
    }

    #[test]
    fn renders_tools_with_python_json_and_date() {
        let t = ChatTemplate::new(TOOLS_STYLE, Some("<|bos|>".into()), None).unwrap();
        let mut extra = serde_json::Map::new();
        extra.insert(
            "tools".into(),
            json!([{"name": "get_weather", "parameters": {"city": "<str>", "days": 2.5, "n": 3, "tags": []}}]),
        );
        let opts = ChatOptions {
            add_generation_prompt: true,
            extra,
        };
        let out = t
            .render(&msgs(&[("system", "  Sys.  "), ("user", " Hello ")]), &opts)
            .unwrap();
        let today = strftime_utc_now("%d %b %Y");
        let expected = format!(
            "<|bos|><|start_header_id|>system<|end_header_id|>\n\nToday Date: {today}\n\
             {{\n    \"name\": \"get_weather\",\n    \"parameters\": {{\n        \"city\": \"<str>\",\n        \
             \"days\": 2.5,\n        \"n\": 3,\n        \"tags\": []\n    }}\n}}\n\n\
             Sys.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        assert_eq!(out, expected);
    }

    #[test]
    fn raise_exception_is_a_rejection_with_its_message() {
        let t = ChatTemplate::new(TOOLS_STYLE, None, None).unwrap();
        let err = t
            .render(
                &msgs(&[("user", "a"), ("system", "late")]),
                &ChatOptions::default(),
            )
            .unwrap_err();
        assert_eq!(
            err,
            ChatTemplateError::Rejected(
                "System message must be first, got one at position 1".into()
            )
        );
    }

    #[test]
    fn broken_templates_are_syntax_errors() {
        let err = ChatTemplate::new("{% for m in messages %}", None, None).unwrap_err();
        assert!(matches!(err, ChatTemplateError::Syntax(_)), "{err:?}");
    }

    #[test]
    fn render_json_passes_structured_content() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ m.role }}:{{ m.content[0].text }}|{{ m.content | tojson }}{% endfor %}",
            None,
            None,
        )
        .unwrap();
        let out = t
            .render_json(
                &json!([{"role": "user", "content": [{"type": "text", "text": "hé \"q\""}]}]),
                &ChatOptions::default(),
            )
            .unwrap();
        assert_eq!(out, r#"user:hé "q"|[{"text": "hé \"q\"", "type": "text"}]"#);
        assert!(matches!(
            t.render_json(&json!({"role": "user"}), &ChatOptions::default()),
            Err(ChatTemplateError::Render(_))
        ));
    }

    #[test]
    fn python_floats_and_dates() {
        assert_eq!(py_float(1.0), "1.0");
        assert_eq!(py_float(0.1), "0.1");
        assert_eq!(py_float(1e-5), "1e-05");
        assert_eq!(py_float(2.5e20), "2.5e+20");
        // 2024-02-29 12:34:56 UTC, a Thursday.
        let t = 1_709_210_096;
        assert_eq!(
            strftime_utc("%Y-%m-%d %H:%M:%S %a %A %b %B %j %y %%", t),
            "2024-02-29 12:34:56 Thu Thursday Feb February 060 24 %"
        );
        assert_eq!(strftime_utc("%d %b %Y", 0), "01 Jan 1970");
    }
}
