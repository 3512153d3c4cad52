//! The [`Engine`]: every detector over one stream of inputs, and its state file.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::alert::Alert;
use crate::amount::{Amount, AmountState};
use crate::bursts::{Bursts, BurstsState};
use crate::config::AnomaliesConfig;
use crate::detector::Detector;
use crate::error::DetectorError;
use crate::first_seen::{FirstSeen, FirstSeenState};
use crate::input::Input;
use crate::rate::{RateState, RequestRate};
use crate::refunds::{Refunds, RefundsState};
use crate::webhook_surge::{WebhookSurge, WebhookSurgeState};

/// The version of [`EngineState`]'s format; a file of another version is refused with a message.
pub const STATE_VERSION: u32 = 1;

/// Input times are clamped to [1970-01-01, about 2255]: in that range no time arithmetic of any
/// detector can overflow.
pub const MAX_TIME_US: i64 = 1 << 53;

fn clamp_time(at_us: i64) -> i64 {
    at_us.clamp(0, MAX_TIME_US)
}

/// How often (in input time) the engine moves every detector's clock (closing idle buckets).
const TICK_US: i64 = 60_000_000;

/// Everything the detectors have learned; serialisable, so it can be saved and restored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineState {
    pub version: u32,
    /// The engine's clock: the latest input or tick time, µs.
    pub now_us: i64,
    pub request_rate: RateState,
    pub amount: AmountState,
    pub refunds: RefundsState,
    pub bursts: BurstsState,
    pub first_seen: FirstSeenState,
    pub webhook_surge: WebhookSurgeState,
}

impl Default for EngineState {
    fn default() -> Self {
        EngineState {
            version: STATE_VERSION,
            now_us: i64::MIN,
            request_rate: RateState::default(),
            amount: AmountState::default(),
            refunds: RefundsState::default(),
            bursts: BurstsState::default(),
            first_seen: FirstSeenState::default(),
            webhook_surge: WebhookSurgeState::default(),
        }
    }
}

/// All detectors, fed in time order.
#[derive(Debug)]
pub struct Engine {
    now_us: i64,
    last_tick: i64,
    request_rate: RequestRate,
    amount: Amount,
    refunds: Refunds,
    bursts: Bursts,
    first_seen: FirstSeen,
    webhook_surge: WebhookSurge,
}

impl Engine {
    /// An engine with nothing learned. `config` must have passed [`AnomaliesConfig::validate`].
    pub fn new(config: &AnomaliesConfig) -> Self {
        Engine::with_state(config, EngineState::default())
    }

    /// An engine that goes on from `state` (learned under this or another configuration).
    pub fn with_state(config: &AnomaliesConfig, state: EngineState) -> Self {
        let n = config.max_series;
        Engine {
            now_us: state.now_us,
            last_tick: state.now_us.div_euclid(TICK_US),
            request_rate: RequestRate::new(config.request_rate.clone(), n, state.request_rate),
            amount: Amount::new(config.amount.clone(), n, state.amount),
            refunds: Refunds::new(config.refunds.clone(), n, state.refunds),
            bursts: Bursts::new(config.bursts.clone(), n, state.bursts),
            first_seen: FirstSeen::new(config.first_seen.clone(), n, state.first_seen),
            webhook_surge: WebhookSurge::new(config.webhook_surge.clone(), n, state.webhook_surge),
        }
    }

    fn detectors(&mut self) -> [&mut dyn Detector; 6] {
        [
            &mut self.request_rate,
            &mut self.amount,
            &mut self.refunds,
            &mut self.bursts,
            &mut self.first_seen,
            &mut self.webhook_surge,
        ]
    }

    /// Feeds one input; returns the alerts it raised (in `alert` and `shadow` mode alike).
    /// The input's time is clamped to what the detectors can count, and the texts a caller
    /// chose (`currency`, `stripe_account`) that are not of their field's shape become
    /// [`crate::input::INVALID`] ([`crate::input::normalized`]): alerts quote these values, so
    /// nothing else (a card number, a key sent as a header) can reach an alert, a log line or a
    /// state file through them.
    pub fn observe(&mut self, input: &Input) -> Vec<Alert> {
        let mut out = Vec::new();
        let at = clamp_time(input.at_us());
        let cleaned;
        let input = match crate::input::normalized(input, at) {
            None => input,
            Some(copy) => {
                cleaned = copy;
                &cleaned
            }
        };
        self.tick(at.max(self.now_us), &mut out);
        for d in self.detectors() {
            d.observe(input, &mut out);
        }
        out
    }

    /// Moves the clock to `now_us` (wall clock in a live run, the end of the range in a batch
    /// run): closes buckets that ended, which is where silences are found.
    pub fn advance(&mut self, now_us: i64) -> Vec<Alert> {
        let mut out = Vec::new();
        let now_us = clamp_time(now_us);
        if now_us > self.now_us {
            self.last_tick = i64::MIN;
            self.tick(now_us, &mut out);
        }
        out
    }

    fn tick(&mut self, at: i64, out: &mut Vec<Alert>) {
        self.now_us = self.now_us.max(at);
        let tick = at.div_euclid(TICK_US);
        if tick > self.last_tick {
            self.last_tick = tick;
            for d in self.detectors() {
                d.advance(at, out);
            }
        }
    }

    /// Inputs dropped because some detector had `max_series` series.
    pub fn dropped_inputs(&mut self) -> u64 {
        self.detectors().iter().map(|d| d.dropped_inputs()).sum()
    }

    /// A copy of everything learned.
    pub fn state(&self) -> EngineState {
        EngineState {
            version: STATE_VERSION,
            now_us: self.now_us,
            request_rate: self.request_rate.state.clone(),
            amount: self.amount.state.clone(),
            refunds: self.refunds.state.clone(),
            bursts: self.bursts.state.clone(),
            first_seen: self.first_seen.state.clone(),
            webhook_surge: self.webhook_surge.state.clone(),
        }
    }
}

impl EngineState {
    /// Writes the state atomically: a temporary file beside `path`, fsynced, renamed over
    /// `path`, then the folder fsynced; a crash leaves the old file or the new one, never half.
    pub fn save(&self, path: &Path) -> Result<(), DetectorError> {
        let io = |source| DetectorError::StateIo { path: path.to_owned(), source };
        let bytes = serde_json::to_vec(self)
            .map_err(|e| DetectorError::StateFormat { path: path.to_owned(), detail: e.to_string() })?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => std::path::PathBuf::from("."),
        };
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "state".into());
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let result = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, path)?;
            std::fs::File::open(&dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map_err(io)
    }

    /// Reads a saved state; `Ok(None)` when there is no file yet.
    pub fn load(path: &Path) -> Result<Option<EngineState>, DetectorError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(DetectorError::StateIo { path: path.to_owned(), source }),
        };
        let format = |detail: String| DetectorError::StateFormat { path: path.to_owned(), detail };
        let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| format(e.to_string()))?;
        let version = value.get("version").and_then(serde_json::Value::as_u64);
        if version != Some(u64::from(STATE_VERSION)) {
            return Err(format(format!("format version {version:?}, this keygate reads version {STATE_VERSION}")));
        }
        serde_json::from_value(value).map(Some).map_err(|e| format(e.to_string()))
    }
}
