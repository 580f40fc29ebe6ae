use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};

use queue_worker::cli::{self, Command};
use queue_worker::{commands, config, error_chain, logging, Config, Error};

fn main() -> ExitCode {
    let command = match cli::parse(std::env::args_os().skip(1)) {
        Ok(c) => c,
        Err(e) => return fail(&Error::Usage(format!("{e}\n\n{}", cli::USAGE))),
    };
    match command {
        Command::Help => {
            print!("{}\n{}", cli::USAGE, config::help());
            return ExitCode::SUCCESS;
        }
        Command::Version => {
            println!("queue-worker {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    let config = match Config::from_lookup(|name| std::env::var(name).ok()) {
        Ok(c) => c,
        Err(e) => return fail(&Error::Config(e)),
    };
    logging::init(&config.log);
    for notice in &config.notices {
        log::info!("{notice}");
    }
    let names = std::env::vars_os().filter_map(|(k, _)| k.into_string().ok());
    for warning in config::unknown_settings(names) {
        log::warn!("{warning}");
    }
    let result = match command {
        Command::Publish(args) => commands::publish(&config, &args),
        Command::Status { json } => commands::status(&config, json),
        _ => run(config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// SIGINT or SIGTERM drains; a second signal exits at once.
fn run(config: Config) -> Result<(), Error> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let signals = AtomicUsize::new(0);
    ctrlc::set_handler(move || {
        if signals.fetch_add(1, Ordering::SeqCst) == 0 {
            let _ = tx.try_send(());
        } else {
            eprintln!("queue-worker: second signal, exiting now");
            std::process::exit(130);
        }
    })
    .map_err(|e| Error::Fatal(format!("cannot handle signals: {}", error_chain(&e))))?;
    queue_worker::supervisor::run(config, rx)
}

fn fail(e: &Error) -> ExitCode {
    let text = error_chain(e);
    if log::log_enabled!(log::Level::Error) {
        log::error!("{text}");
    } else {
        eprintln!("queue-worker: {text}");
    }
    ExitCode::from(e.exit_code())
}
