//! Reads the Prometheus text format (0.0.4) just enough for tests: samples with labels.

use std::collections::BTreeMap;

/// One scrape of a `/metrics` endpoint.
#[derive(Debug, Clone)]
pub struct Scrape {
    pub text: String,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
            .filter_map(parse_sample)
            .collect();
        Self {
            text: text.to_owned(),
            samples,
        }
    }

    /// GETs `url` and parses the body; `None` if it does not answer 200.
    pub async fn get(http: &reqwest::Client, url: &str) -> Option<Self> {
        let response = http.get(url).send().await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        Some(Self::parse(&response.text().await.ok()?))
    }

    /// The value of the sample `name` whose labels include every pair of `labels`; the sum
    /// when several match, `None` when none does.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut matching = self
            .samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).is_some_and(|found| found == v))
            })
            .map(|(_, _, value)| *value)
            .peekable();
        matching.peek()?;
        Some(matching.sum())
    }

    /// Whether a `# TYPE <name> <kind>` line declares `name`.
    pub fn has_type(&self, name: &str, kind: &str) -> bool {
        let line = format!("# TYPE {name} {kind}");
        self.text.lines().any(|l| l == line)
    }
}

fn parse_sample(line: &str) -> Option<(String, BTreeMap<String, String>, f64)> {
    let (series, value) = line.rsplit_once(' ')?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other.parse().ok()?,
    };
    let Some((name, labels)) = series.split_once('{') else {
        return Some((series.to_owned(), BTreeMap::new(), value));
    };
    let mut parsed = BTreeMap::new();
    let mut rest = labels.strip_suffix('}')?;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        // Label values escape `"` and `\`: scan to the closing quote.
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => {
                    let (_, escaped) = chars.next()?;
                    value.push(if escaped == 'n' { '\n' } else { escaped });
                }
                '"' => break i,
                c => value.push(c),
            }
        };
        parsed.insert(key.trim_start_matches(',').to_owned(), value);
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    Some((name.to_owned(), parsed, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_samples_with_labels() {
        let scrape = Scrape::parse(
            "# TYPE a counter\na_total 3\nb{x=\"1\",y=\"q\\\"uote\"} 2.5\nb{x=\"2\"} 1\nc_bucket{le=\"+Inf\"} 4\n",
        );
        assert_eq!(scrape.value("a_total", &[]), Some(3.0));
        assert_eq!(scrape.value("b", &[("y", "q\"uote")]), Some(2.5));
        assert_eq!(scrape.value("b", &[]), Some(3.5));
        assert_eq!(scrape.value("c_bucket", &[("le", "+Inf")]), Some(4.0));
        assert_eq!(scrape.value("missing", &[]), None);
        assert!(scrape.has_type("a", "counter"));
    }
}
