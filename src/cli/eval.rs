//! `peftkit eval --base M [--adapter DIR] [--load-in-4bit] --data FILE [--format F] [--json]`: mean loss and
//! perplexity of a dataset, scored as training scores it.
//! `peftkit eval … --questions FILE [--answers OUT.jsonl]`: greedy answers to held-out questions, each checked for
//! the fact it must contain — the domain-bot check ("does the tuned model know the facts?").
//! With several adapters (`--adapter a=DIR --adapter b=DIR`), the base is loaded once and each adapter is scored in
//! turn: a comparison table, one row per adapter (with --json, one line per adapter with its "adapter" name;
//! with --answers, one file per adapter, `OUT.NAME.jsonl`).

use super::{load_model, user, ModelArgs};
use anyhow::{Context, Result};
use peftkit::data::Message;
use peftkit::data::{self, EncodeOptions, Format};
use peftkit::generate::{Generator, SamplingParams};
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The dataset (JSONL or JSON array) to score: loss and perplexity.
    #[arg(long, required_unless_present = "questions")]
    pub data: Option<PathBuf>,
    /// Questions to answer (JSONL: {"question": …, "expected": "…" or ["…", …]}): each greedy reply passes when
    /// it contains an expected string (case and spacing ignored).
    #[arg(long)]
    pub questions: Option<PathBuf>,
    /// With --questions: write every question, reply and verdict here (JSONL).
    #[arg(long, requires = "questions")]
    pub answers: Option<PathBuf>,
    /// With --questions: a system message for every question.
    #[arg(long, requires = "questions")]
    pub system: Option<String>,
    /// With --questions: most tokens per reply.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// chat, alpaca, completion or tokens (default: detected from the first record).
    #[arg(long)]
    pub format: Option<String>,
    /// Longer examples are truncated to this many tokens.
    #[arg(long, default_value_t = 2048)]
    pub sequence_len: usize,
    /// Also score prompt tokens (chat and alpaca data), as a recipe with `train_on_inputs: true` trains.
    #[arg(long)]
    pub train_on_inputs: bool,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Print one JSON line: {"loss": …, "perplexity": …, "tokens": …} and, with --questions,
    /// "questions": {"total": …, "correct": …, "accuracy": …}; with several adapters, one line per adapter with
    /// its "adapter" name.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let format: Option<Format> = a.format.as_deref().map(str::parse).transpose().map_err(user)?;
    if a.sequence_len == 0 || a.batch_size == 0 || a.max_new_tokens == 0 {
        return Err(user(anyhow::anyhow!("--sequence-len, --batch-size and --max-new-tokens must be positive")));
    }
    // Both inputs are read before the (slow) model load.
    let questions = a.questions.as_deref().map(read_questions).transpose().map_err(user)?;
    // Scoring a file (--data) reads the weights exactly; answering questions alone generates (--quant auto).
    let (mut base, mut adapters) = load_model(&a.model, a.data.is_none())?;
    let ds = match &a.data {
        // The file is scored as in training: loss on supervised tokens only.
        Some(path) => {
            let opts = EncodeOptions {
                sequence_len: a.sequence_len,
                train_on_inputs: a.train_on_inputs,
                vocab_size: Some(base.model.config.vocab_size),
            };
            let ds = data::load_dataset(
                path,
                format,
                &base.tokenizer,
                base.template.as_ref(),
                base.eos_token.as_deref(),
                &opts,
            )
            .map_err(user)?;
            Some(ds)
        }
        None => None,
    };
    if questions.is_some() && base.template.is_none() {
        return Err(user(anyhow::anyhow!("--questions: {} has no chat template to ask the questions with", base.name)));
    }
    // One adapter (or none), or the one --active names: its scores. Several: each scored in turn on the one base,
    // then a comparison table.
    let names: Vec<Option<String>> = if adapters.len() > 1 && a.model.active.is_none() {
        adapters.names().map(|n| Some(n.to_string())).collect()
    } else {
        vec![adapters.active().map(str::to_string)]
    };
    let several = names.len() > 1;
    let mut rows = Vec::new();
    for name in &names {
        if several {
            adapters.activate(&mut base.model, name.as_deref()).map_err(user)?;
            tracing::info!("evaluating adapter {}", name.as_deref().unwrap_or("none"));
        }
        let mut json = serde_json::Map::new();
        if several {
            json.insert("adapter".into(), name.clone().into());
        }
        if let (Some(ds), Some(path)) = (&ds, &a.data) {
            let r = peftkit::train::evaluate(&base.model, &ds.examples, a.batch_size, base.pad_id)?;
            json.insert("loss".into(), r.loss.into());
            json.insert("perplexity".into(), r.perplexity.into());
            json.insert("tokens".into(), r.tokens.into());
            if !a.json && !several {
                println!(
                    "{}: {} examples ({} format), {} predicted tokens: loss {:.4}, perplexity {:.3}",
                    path.display(),
                    ds.stats.examples,
                    ds.format,
                    r.tokens,
                    r.loss,
                    r.perplexity
                );
                if ds.stats.truncated > 0 {
                    println!("note: {} examples were truncated to {} tokens", ds.stats.truncated, a.sequence_len);
                }
            }
        }
        if let (Some(questions), Some(path)) = (&questions, &a.questions) {
            let answers = a.answers.as_ref().map(|out| match (several, name) {
                (true, Some(n)) => with_suffix(out, n),
                _ => out.clone(),
            });
            let q = ask(&base, &a, questions, answers.as_deref())?;
            if !a.json && !several {
                println!(
                    "{}: {} of {} greedy answers contain the expected fact ({:.1}%)",
                    path.display(),
                    q["correct"],
                    q["total"],
                    100.0 * q["accuracy"].as_f64().unwrap_or(0.0)
                );
            }
            json.insert("questions".into(), q);
        }
        if a.json {
            println!("{}", serde_json::Value::Object(json.clone()));
        }
        rows.push(json);
    }
    if several && !a.json {
        print_table(&rows, a.data.as_deref(), a.questions.as_deref(), ds.as_ref().map(|d| d.stats.truncated));
    }
    Ok(())
}

/// `out` with `.NAME` before its extension: `answers.jsonl` → `answers.NAME.jsonl` (one file per adapter).
fn with_suffix(out: &Path, name: &str) -> PathBuf {
    let stem = out.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    let file = match out.extension() {
        Some(ext) => format!("{stem}.{name}.{}", ext.to_string_lossy()),
        None => format!("{stem}.{name}"),
    };
    out.with_file_name(file)
}

/// The comparison table of several adapters: one row each.
fn print_table(
    rows: &[serde_json::Map<String, serde_json::Value>],
    data: Option<&Path>,
    questions: Option<&Path>,
    truncated: Option<usize>,
) {
    if let Some(d) = data {
        print!("data: {}", d.display());
        if let Some(t) = rows.first().and_then(|r| r.get("tokens")) {
            print!(" ({t} predicted tokens)");
        }
        println!();
    }
    if let Some(q) = questions {
        println!("questions: {}", q.display());
    }
    let width = rows.iter().filter_map(|r| r["adapter"].as_str()).map(str::len).max().unwrap_or(0).max(7);
    let mut head = format!("{:<width$}", "adapter");
    if data.is_some() {
        head.push_str(&format!("  {:>9}  {:>10}", "loss", "perplexity"));
    }
    if questions.is_some() {
        head.push_str(&format!("  {:>9}  {:>8}", "correct", "accuracy"));
    }
    println!("{head}");
    for r in rows {
        let mut line = format!("{:<width$}", r["adapter"].as_str().unwrap_or("none"));
        if data.is_some() {
            let f = |k: &str| r.get(k).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
            line.push_str(&format!("  {:>9.4}  {:>10.3}", f("loss"), f("perplexity")));
        }
        if let Some(q) = r.get("questions") {
            let correct = format!("{}/{}", q["correct"], q["total"]);
            let acc = 100.0 * q["accuracy"].as_f64().unwrap_or(0.0);
            line.push_str(&format!("  {correct:>9}  {acc:>7.1}%"));
        }
        println!("{line}");
    }
    if let Some(t) = truncated.filter(|t| *t > 0) {
        println!("note: {t} examples were truncated");
    }
}

/// Asks every question greedily with the model as it is; writes the answers to `answers` when given. Returns
/// {"total", "correct", "accuracy"}.
fn ask(
    base: &peftkit::base::BaseModel,
    a: &Args,
    questions: &[Question],
    answers: Option<&Path>,
) -> Result<serde_json::Value> {
    let Some(template) = base.template.as_ref() else {
        return Err(user(anyhow::anyhow!("--questions: {} has no chat template to ask the questions with", base.name)));
    };
    let mut generator = Generator::new(&base.model);
    let params = SamplingParams::greedy(a.max_new_tokens);
    let mut correct = 0;
    let mut records = Vec::new();
    for (i, q) in questions.iter().enumerate() {
        let mut messages = Vec::new();
        if let Some(system) = &a.system {
            messages.push(Message::new("system", system));
        }
        messages.push(Message::new("user", &q.question));
        let prompt = template.render(&messages, true).map_err(user)?;
        let ids = base.tokenizer.encode(prompt, false).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        // Each question is asked afresh (no cache reuse between questions).
        generator.reset();
        let out = generator.generate(ids.get_ids(), &params, &base.stop_ids, |_| Ok::<_, anyhow::Error>(true))?;
        let reply =
            base.tokenizer.decode(out.content_tokens(), true).map_err(|e| anyhow::anyhow!("decoding a reply: {e}"))?;
        let pass = contains_expected(&reply, &q.expected);
        correct += usize::from(pass);
        tracing::info!(
            "[{}/{}] {} {} → {}",
            i + 1,
            questions.len(),
            if pass { "ok  " } else { "miss" },
            q.question,
            reply.trim().replace('\n', " ")
        );
        records.push(serde_json::json!({
            "question": q.question, "expected": q.expected, "reply": reply.trim(), "correct": pass,
        }));
    }
    let total = questions.len();
    if let Some(out) = answers {
        let text: String = records.iter().map(|r| format!("{r}\n")).collect();
        peftkit::adapter::peft_format::write_atomic(out, text.as_bytes())?;
    }
    Ok(serde_json::json!({"total": total, "correct": correct, "accuracy": correct as f64 / total as f64}))
}

/// One question of a `--questions` file.
#[derive(Debug, serde::Deserialize)]
struct Question {
    question: String,
    #[serde(deserialize_with = "one_or_many")]
    expected: Vec<String>,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// Reads a questions file; a bad line is named by its number.
fn read_questions(path: &Path) -> Result<Vec<Question>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let q: Question = serde_json::from_str(line).map_err(|e| {
            anyhow::anyhow!("{}:{}: {e} (each line: {{\"question\": …, \"expected\": …}})", path.display(), i + 1)
        })?;
        if q.expected.iter().all(|e| e.trim().is_empty()) {
            anyhow::bail!("{}:{}: `expected` is empty", path.display(), i + 1);
        }
        out.push(q);
    }
    if out.is_empty() {
        anyhow::bail!("{}: no questions", path.display());
    }
    Ok(out)
}

/// Whether `reply` contains one of `expected`, ignoring case and runs of whitespace.
fn contains_expected(reply: &str, expected: &[String]) -> bool {
    let norm = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
    let reply = norm(reply);
    expected.iter().map(|e| norm(e)).any(|e| !e.is_empty() && reply.contains(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_facts_are_matched_ignoring_case_and_spacing() {
        let e = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(contains_expected("The warranty lasts 30  months.", &e(&["30 months"])));
        assert!(contains_expected("Call Ottilie brandvold", &e(&["nobody", "Ottilie Brandvold"])));
        assert!(!contains_expected("It lasts 3 months", &e(&["30 months"])));
        assert!(!contains_expected("anything", &e(&[""])));
    }

    #[test]
    fn answers_of_several_adapters_go_to_one_file_each() {
        assert_eq!(with_suffix(Path::new("out/answers.jsonl"), "a"), PathBuf::from("out/answers.a.jsonl"));
        assert_eq!(with_suffix(Path::new("answers"), "b.1"), PathBuf::from("answers.b.1"));
    }

    #[test]
    fn questions_files_are_checked_line_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("q.jsonl");
        std::fs::write(
            &p,
            "{\"question\": \"a?\", \"expected\": \"b\"}\n{\"question\": \"c?\", \"expected\": [\"d\", \"e\"]}\n",
        )
        .unwrap();
        let qs = read_questions(&p).unwrap();
        assert_eq!(qs[1].expected, vec!["d", "e"]);
        std::fs::write(&p, "{\"question\": \"a?\", \"expected\": \"b\"}\n{\"question\": 3}\n").unwrap();
        let err = read_questions(&p).unwrap_err().to_string();
        assert!(err.contains("q.jsonl:2"), "{err}");
    }
}
