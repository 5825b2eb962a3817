//! `flashpack.open(path, ...)`: a model opened through the library's one way
//! to open a model ([`flashpack::runtime::Session`]), with `generate`,
//! `stream`, `logits` and `perplexity`. The session does the work; this file
//! turns keyword arguments into its options and its reports into Python.

use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};

use pyo3::prelude::*;
use pyo3::types::PyByteArray;

use flashpack::runtime::generate::GenerateOptions;
use flashpack::runtime::sampling::{SamplingDefaults, SamplingParams};
use flashpack::runtime::session::GenerationReport;
use flashpack::runtime::sparse::{FfnMode, Selector};
use flashpack::runtime::{Session, SessionOptions};
use flashpack::Error;

use crate::{invalid, raise, to_python};

/// The value of `names` whose name is `text`, or a message listing them.
fn choose<T: Copy>(what: &str, text: &str, names: &[(&str, T)]) -> Result<T, String> {
    names
        .iter()
        .find(|(name, _)| *name == text)
        .map(|(_, value)| *value)
        .ok_or_else(|| {
            let all: Vec<&str> = names.iter().map(|(n, _)| *n).collect();
            format!("{what} {text:?}: expected one of {}", all.join(", "))
        })
}

/// The FFN modes by the names the command line's `--ffn` takes.
fn ffn_mode(text: &str) -> Result<FfnMode, String> {
    use FfnMode::*;
    let modes = [Dense, Oracle, Predicted, Naive, Flash, OracleFlash];
    let names: Vec<(&str, FfnMode)> = modes.iter().map(|m| (m.name(), *m)).collect();
    choose("ffn", text, &names)
}

/// A model opened for one FFN mode (`flashpack.open`). Calls from several
/// Python threads take turns; each runs with the GIL released.
#[pyclass(module = "flashpack._native", name = "Model", frozen)]
pub struct Model {
    session: Arc<Mutex<Session>>,
    /// The path as given and as resolved (a Hub id to its snapshot).
    name: String,
    path: PathBuf,
    /// The model's `generation_config.json`: the sampling defaults.
    sampling_defaults: SamplingDefaults,
    vocab_size: usize,
    max_context: usize,
}

/// Opens a checkpoint directory or flashpack file (or a Hub id in the local
/// cache) for an FFN mode.
#[pyfunction]
#[pyo3(signature = (
    path, *, ffn = None, dram_budget = None, window = None, io_threads = None,
    io_engine = None, coalesce_gap = None, verify_reads = true, selector = None,
    context = None, threads = None
))]
#[allow(clippy::too_many_arguments)]
pub fn open(
    py: Python<'_>,
    path: PathBuf,
    ffn: Option<String>,
    dram_budget: Option<String>,
    window: Option<usize>,
    io_threads: Option<usize>,
    io_engine: Option<String>,
    coalesce_gap: Option<usize>,
    verify_reads: bool,
    selector: Option<String>,
    context: Option<usize>,
    threads: Option<usize>,
) -> PyResult<Model> {
    use flashpack::runtime::flash::io::IoEngine;
    let parse = || -> Result<SessionOptions, String> {
        let defaults = SessionOptions::default();
        Ok(SessionOptions {
            ffn: ffn.as_deref().map(ffn_mode).transpose()?,
            dram_budget: dram_budget.clone(),
            window,
            io_threads,
            io_engine: io_engine
                .as_deref()
                .map(|e| {
                    choose(
                        "io_engine",
                        e,
                        &[
                            ("auto", IoEngine::Auto),
                            ("threads", IoEngine::Threads),
                            ("uring", IoEngine::Uring),
                        ],
                    )
                })
                .transpose()?,
            coalesce_gap,
            verify_reads,
            selector: match selector.as_deref() {
                None => Selector::Auto,
                Some(s) => choose(
                    "selector",
                    s,
                    &[
                        ("auto", Selector::Auto),
                        ("trained", Selector::Trained),
                        ("int8", Selector::Int8),
                        ("int4", Selector::Int4),
                    ],
                )?,
            },
            context: match context {
                Some(0) => return Err("context must be at least 1".into()),
                Some(c) => c,
                None => defaults.context,
            },
            threads,
        })
    };
    let options = parse().map_err(|m| invalid(py, m))?;
    let name = path.display().to_string();
    let opened = py.allow_threads(|| -> Result<_, Error> {
        let resolved = flashpack::input::hub::resolve_model(&path)?;
        let config = flashpack::runtime::open::generation_config(&resolved)?;
        let session = Session::open(&resolved, &options)?;
        Ok((resolved, config, session))
    });
    let (resolved, config, session) = opened.map_err(|e| raise(py, e))?;
    let model_config = &session.model().config;
    Ok(Model {
        vocab_size: model_config.vocab_size,
        max_context: model_config.max_context,
        name,
        path: resolved,
        sampling_defaults: SamplingDefaults::from_generation_config(config.as_ref()),
        session: Arc::new(Mutex::new(session)),
    })
}

/// Sampling keyword arguments as they arrive from Python (`None`: the
/// model's `generation_config.json`, else off).
#[derive(Clone)]
struct Sampling {
    temperature: Option<f32>,
    top_k: Option<usize>,
    top_p: Option<f32>,
    min_p: Option<f32>,
    repeat_penalty: Option<f32>,
    seed: Option<u64>,
}

impl Sampling {
    /// The parameters over the model's defaults, validated, and a warning
    /// for each argument greedy decoding does not use.
    fn params(&self, defaults: &SamplingDefaults) -> Result<(SamplingParams, Vec<String>), Error> {
        if let Some(seed) = self.seed {
            if seed > flashpack::runtime::sampling::MAX_JSON_SAFE_INTEGER {
                return Err(Error::InvalidArgument(format!(
                    "seed {seed} is above 2^53 - 1 (JSON readers would not read it back exactly)"
                )));
            }
        }
        let params = SamplingParams {
            temperature: self.temperature.unwrap_or(defaults.temperature),
            top_k: self.top_k.or(defaults.top_k),
            top_p: self.top_p.or(defaults.top_p),
            min_p: self.min_p.or(defaults.min_p),
            repetition_penalty: self.repeat_penalty.unwrap_or(defaults.repetition_penalty),
            seed: self
                .seed
                .unwrap_or_else(flashpack::runtime::sampling::clock_seed),
        };
        params.validate()?;
        let unused: Vec<&str> = [
            ("top_k", self.top_k.is_some()),
            ("top_p", self.top_p.is_some()),
            ("min_p", self.min_p.is_some()),
            ("seed", self.seed.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, given)| given.then_some(name))
        .collect();
        let warnings = if params.is_greedy() && !unused.is_empty() {
            vec![format!(
                "{} have no effect with greedy decoding (temperature 0)",
                unused.join(", ")
            )]
        } else {
            Vec::new()
        };
        Ok((params, warnings))
    }
}

/// The keys of `flashpack run --json`: the generation report with the model's
/// name and path, the warnings, and no logits file.
#[derive(serde::Serialize)]
struct RunReport<'a> {
    model: &'a str,
    model_path: String,
    #[serde(flatten)]
    generation: GenerationReport,
    warnings: Vec<String>,
    logits_file: Option<String>,
    logits_rows: Option<usize>,
}

impl Model {
    /// The prompt's ids and the generation options for one generation.
    fn prepare(
        &self,
        session: &Session,
        prompt: &str,
        max_new_tokens: usize,
        stop: Vec<String>,
        sampling: &Sampling,
    ) -> Result<(Vec<u32>, GenerateOptions, Vec<String>), Error> {
        let (sampling, warnings) = sampling.params(&self.sampling_defaults)?;
        let ids = session.tokenizer().encode(prompt)?;
        let mut options = session.generate_options(max_new_tokens, sampling);
        options.stop_strings = stop;
        Ok((ids, options, warnings))
    }

    /// The run report as Python.
    fn report(
        &self,
        py: Python<'_>,
        generation: GenerationReport,
        warnings: Vec<String>,
    ) -> PyResult<PyObject> {
        to_python(
            py,
            &RunReport {
                model: &self.name,
                model_path: self.path.display().to_string(),
                generation,
                warnings,
                logits_file: None,
                logits_rows: None,
            },
        )
    }
}

#[pymethods]
impl Model {
    /// Generates after `prompt`; returns the dict `flashpack run --json` prints
    /// (`text`, `generated_ids`, `prompt_ids`, `stop_reason`, timings, I/O).
    #[pyo3(signature = (
        prompt, max_new_tokens = 128, *, temperature = None, top_k = None, top_p = None,
        min_p = None, repeat_penalty = None, seed = None, stop = None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        prompt: String,
        max_new_tokens: usize,
        temperature: Option<f32>,
        top_k: Option<usize>,
        top_p: Option<f32>,
        min_p: Option<f32>,
        repeat_penalty: Option<f32>,
        seed: Option<u64>,
        stop: Option<Vec<String>>,
    ) -> PyResult<PyObject> {
        let sampling = Sampling {
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty,
            seed,
        };
        let session = self.session.clone();
        let result = py.allow_threads(|| {
            let session = session.lock().unwrap_or_else(|e| e.into_inner());
            let (ids, options, warnings) = self.prepare(
                &session,
                &prompt,
                max_new_tokens,
                stop.unwrap_or_default(),
                &sampling,
            )?;
            let report = session.generate(&ids, &options, |_| Ok(()))?;
            Ok::<_, Error>((report, warnings))
        });
        let (report, warnings) = result.map_err(|e| raise(py, e))?;
        self.report(py, report, warnings)
    }

    /// Generates after `prompt` as `generate` does, yielding each piece of
    /// text as soon as it is final; the finished iterator's `report` is what
    /// `generate` returns.
    #[pyo3(signature = (
        prompt, max_new_tokens = 128, *, temperature = None, top_k = None, top_p = None,
        min_p = None, repeat_penalty = None, seed = None, stop = None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn stream(
        slf: Bound<'_, Self>,
        prompt: String,
        max_new_tokens: usize,
        temperature: Option<f32>,
        top_k: Option<usize>,
        top_p: Option<f32>,
        min_p: Option<f32>,
        repeat_penalty: Option<f32>,
        seed: Option<u64>,
        stop: Option<Vec<String>>,
    ) -> PyResult<Stream> {
        let sampling = Sampling {
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty,
            seed,
        };
        let model = slf.clone().unbind();
        let this = slf.get();
        let session = this.session.clone();
        let defaults = this.sampling_defaults;
        // Unbounded: the generation never waits for its reader, so it always
        // ends and frees the model, even while the reader's thread waits on
        // the same model (a `generate` call between two pieces). A dropped
        // reader stops it at the next piece.
        let (tx, rx) = channel::<Piece>();
        let worker = std::thread::Builder::new()
            .name("flashpack-stream".into())
            .spawn(move || {
                let session = session.lock().unwrap_or_else(|e| e.into_inner());
                let run = || -> Result<(GenerationReport, Vec<String>), Error> {
                    let (params, warnings) = sampling.params(&defaults)?;
                    let ids = session.tokenizer().encode(&prompt)?;
                    let mut options = session.generate_options(max_new_tokens, params);
                    options.stop_strings = stop.unwrap_or_default();
                    let report = session.generate(&ids, &options, |piece| {
                        // The reader went away (the iterator was dropped): stop.
                        tx.send(Piece::Text(piece.to_string())).map_err(|_| {
                            Error::InvalidArgument("the stream's reader went away".into())
                        })
                    })?;
                    Ok((report, warnings))
                };
                let end = run();
                let _ = tx.send(Piece::End(Box::new(end)));
            })
            .map_err(|e| PyErr::new::<pyo3::exceptions::PyRuntimeError, _>(e.to_string()))?;
        drop(worker);
        Ok(Stream {
            model,
            rx: Mutex::new(Some(rx)),
            report: Mutex::new(None),
        })
    }

    /// The logits of every position of `ids`, computed as one prompt: a
    /// numpy float32 array of shape `(len(ids), vocab_size)`.
    fn logits(&self, py: Python<'_>, ids: Vec<u32>) -> PyResult<PyObject> {
        let session = self.session.clone();
        let logits = py
            .allow_threads(|| {
                let session = session.lock().unwrap_or_else(|e| e.into_inner());
                session.logits(&ids)
            })
            .map_err(|e| raise(py, e))?;
        let rows = logits.len() / self.vocab_size;
        let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_ne_bytes()).collect();
        // A bytearray keeps the array writable, as numpy users expect.
        let buffer = PyByteArray::new(py, &bytes);
        let array = py
            .import("numpy")?
            .call_method1("frombuffer", (buffer, "float32"))?
            .call_method1("reshape", (rows, self.vocab_size))?;
        Ok(array.unbind())
    }

    /// Perplexity of `text` (tokenized with the model's tokenizer) in windows
    /// of `ctx` tokens, as `flashpack eval` computes it.
    #[pyo3(signature = (text, ctx = 256))]
    fn perplexity(&self, py: Python<'_>, text: String, ctx: usize) -> PyResult<f64> {
        let session = self.session.clone();
        py.allow_threads(|| {
            let session = session.lock().unwrap_or_else(|e| e.into_inner());
            session.perplexity_of_text(&text, ctx)
        })
        .map(|r| r.perplexity)
        .map_err(|e| raise(py, e))
    }

    /// The token ids of `text` under the model's tokenizer (what `generate`
    /// and `perplexity` feed the model).
    fn encode(&self, py: Python<'_>, text: String) -> PyResult<Vec<u32>> {
        let session = self.session.clone();
        py.allow_threads(|| {
            let session = session.lock().unwrap_or_else(|e| e.into_inner());
            session.tokenizer().encode(&text)
        })
        .map_err(|e| raise(py, e))
    }

    /// The FFN mode the model runs in (`dense`, `flash`, ...).
    #[getter]
    fn ffn(&self) -> String {
        let session = self.session.lock().unwrap_or_else(|e| e.into_inner());
        session.mode().name().to_string()
    }

    /// The model's path (a Hub id resolved to its local snapshot).
    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// Size of the vocabulary: the number of columns of `logits`.
    #[getter]
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Most positions the model's context holds.
    #[getter]
    fn max_context(&self) -> usize {
        self.max_context
    }

    fn __repr__(&self) -> String {
        format!("flashpack.Model({:?}, ffn={:?})", self.name, self.ffn())
    }
}

/// What the streaming thread sends: text, then the end of the generation.
enum Piece {
    Text(String),
    End(Box<Result<(GenerationReport, Vec<String>), Error>>),
}

/// The iterator `Model.stream` returns.
#[pyclass(module = "flashpack._native", name = "Stream", frozen)]
pub struct Stream {
    /// Keeps the model alive while its thread generates.
    model: Py<Model>,
    /// `None` once the generation ended.
    rx: Mutex<Option<Receiver<Piece>>>,
    report: Mutex<Option<PyObject>>,
}

#[pymethods]
impl Stream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<String>> {
        let mut guard = self.rx.lock().unwrap_or_else(|e| e.into_inner());
        // Taken out while waiting (a receiver is not shared between threads),
        // put back for the next piece.
        let Some(rx) = guard.take() else {
            return Ok(None);
        };
        let (rx, piece) = py.allow_threads(move || {
            let piece = rx.recv();
            (rx, piece)
        });
        match piece {
            Ok(Piece::Text(text)) => {
                *guard = Some(rx);
                Ok(Some(text))
            }
            Ok(Piece::End(end)) => {
                let (generation, warnings) = (*end).map_err(|e| raise(py, e))?;
                let report = self.model.get().report(py, generation, warnings)?;
                *self.report.lock().unwrap_or_else(|e| e.into_inner()) = Some(report);
                Ok(None)
            }
            // The thread ended without a word: it panicked.
            Err(_) => Err(PyErr::new::<pyo3::exceptions::PyRuntimeError, _>(
                "the generation thread ended unexpectedly",
            )),
        }
    }

    /// The run report (`generate`'s dict) once the iterator is exhausted,
    /// else None.
    #[getter]
    fn report(&self, py: Python<'_>) -> Option<PyObject> {
        self.report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|r| r.clone_ref(py))
    }
}
