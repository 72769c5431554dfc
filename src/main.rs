//! `peftkit`: fine-tune LoRA, QLoRA and IA3 adapters on Llama-family models. Errors print as `error: …` with their causes;
//! the exit code is 2 for a user error (bad input), 1 for anything else.

mod cli;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "peftkit",
    version,
    about = "Parameter-efficient fine-tuning (LoRA, QLoRA, IA3) of Llama-family models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train an adapter from a YAML recipe.
    Train(cli::train::Args),
    /// Measure a model (with or without an adapter) on a dataset: mean NLL and perplexity.
    Eval(cli::eval::Args),
    /// Measure adapter training speed and memory (LoRA, --qlora, --ia3), generation, dequantization or GEMM.
    Bench(cli::bench::Args),
    /// Describe an adapter folder, a model folder or a recipe.
    Inspect(cli::inspect::Args),
    /// Merge an adapter into its base model and write a Hugging Face model folder (safetensors, 16-bit).
    Merge(cli::merge::Args),
    /// Export a LoRA adapter to another format: llama.cpp's LoRA adapter GGUF (--to gguf).
    Export(cli::export::Args),
    /// Publish an adapter or merged-model folder to the Hugging Face Hub in one commit.
    Push(cli::push::Args),
    /// Generate text from a prompt (greedy unless --temperature is set), streamed to stdout.
    Generate(cli::generate::GenerateArgs),
    /// Chat with a model: one user message per stdin line, replies streamed to stdout.
    Chat(cli::generate::ChatArgs),
}

fn main() {
    peftkit::util::tune_runtime();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PEFTKIT_LOG").unwrap_or_else(|_| "peftkit=info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .without_time()
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(a) => cli::train::run(a),
        Command::Eval(a) => cli::eval::run(a),
        Command::Bench(a) => cli::bench::run(a),
        Command::Inspect(a) => cli::inspect::run(a),
        Command::Merge(a) => cli::merge::run(a),
        Command::Export(a) => cli::export::run(a),
        Command::Push(a) => cli::push::run(a),
        Command::Generate(a) => cli::generate::run_generate(a),
        Command::Chat(a) => cli::generate::run_chat(a),
    };
    if let Err(err) = result {
        eprintln!("error: {err}");
        let mut source = err.source();
        // Causes, without repeating a message already shown.
        let mut last = err.to_string();
        while let Some(s) = source {
            let msg = s.to_string();
            if !last.contains(&msg) {
                eprintln!("  caused by: {msg}");
            }
            last = msg;
            source = s.source();
        }
        let code = if err.downcast_ref::<cli::UserError>().is_some() { 2 } else { 1 };
        std::process::exit(code);
    }
}
