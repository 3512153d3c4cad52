//! The Redis store: Redis 7, standalone or behind Sentinel, optionally over TLS and with AUTH,
//! through the `redis` crate's connection manager (one multiplexed connection that reconnects by
//! itself).
//!
//! Every operation is one Lua script, so each is atomic in Redis: the scripts below are the
//! arithmetic of [`crate::window`] line for line, on Redis's own clock (`TIME`), so every replica
//! counts in the same time. Redis 7 replicates a script's effects, not the script, so reading the
//! clock in a script is safe on replicas and in the AOF.
//!
//! The rate-limit fast path: after Redis says "limited, retry after D", this instance answers
//! "limited" locally for D without asking Redis again. GCRA's `tat` only moves forward (other
//! replicas' requests push it later, never earlier), so nothing Redis would have allowed is
//! refused, except for the reply's own network latency, and nothing it would have refused is
//! allowed: the cluster never exceeds the configured rate (margin 0), and a client hammering
//! over its limit costs Redis one call per retry-after period per instance.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo, Script};

use crate::config::RedisStoreConfig;
use crate::store::LimitStore;
use crate::window::{SLOTS, emission_interval_micros, slot_micros};
use crate::{BudgetKey, Charge, ChargeOutcome, ChargeRequest, LimitError, RateOutcome, RateSpec};

/// KEYS[1] budget hash (slot → amount); ARGV amount, max, slot µs, force (0/1), slots.
/// Returns {exceeded (0/1), spent before, charged slot or -1}.
const CHARGE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local amount = tonumber(ARGV[1])
if amount < 0 then amount = 0 end
local max = tonumber(ARGV[2])
local slot_us = tonumber(ARGV[3])
local slots = tonumber(ARGV[5])
local current = math.floor(now / slot_us)
local oldest = current - slots
local fields = redis.call('HGETALL', KEYS[1])
local spent = 0
for i = 1, #fields, 2 do
  if tonumber(fields[i]) < oldest then
    redis.call('HDEL', KEYS[1], fields[i])
  else
    spent = spent + tonumber(fields[i + 1])
  end
end
local exceeded = 0
if spent + amount > max then exceeded = 1 end
if exceeded == 1 and ARGV[4] ~= '1' then
  return {1, spent, -1}
end
if amount > 0 then
  redis.call('HINCRBY', KEYS[1], string.format('%.0f', current), amount)
end
redis.call('PEXPIRE', KEYS[1], math.ceil(slot_us * (slots + 2) / 1000))
return {exceeded, spent, current}
";

/// KEYS[1] budget hash; ARGV slot, amount. Gives the amount back if its slot is still there.
const REFUND: &str = r"
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return 0 end
local left = redis.call('HINCRBY', KEYS[1], ARGV[1], -tonumber(ARGV[2]))
if left <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return 1
";

/// KEYS[1] budget hash; ARGV slot µs, slots. Returns what is spent in the window now.
const SPENT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local oldest = math.floor(now / tonumber(ARGV[1])) - tonumber(ARGV[2])
local fields = redis.call('HGETALL', KEYS[1])
local spent = 0
for i = 1, #fields, 2 do
  if tonumber(fields[i]) >= oldest then spent = spent + tonumber(fields[i + 1]) end
end
return spent
";

/// KEYS[1] the limiter's tat (µs); ARGV emission interval µs, burst.
/// Returns {allowed (1/0), retry after µs}.
const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = interval * (tonumber(ARGV[2]) - 1)
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
if tat - now > tolerance then
  return {0, tat - now - tolerance}
end
tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
return {1, 0}
";

/// Where the connection comes from.
enum Target {
    Standalone(Client),
    Sentinel(tokio::sync::Mutex<redis::sentinel::SentinelClient>),
}

/// The Redis limit store.
pub struct RedisStore {
    target: Target,
    manager_config: ConnectionManagerConfig,
    /// The connection in use; dropped after an error so that Sentinel is asked again.
    connection: Mutex<Option<ConnectionManager>>,
    /// Single flight for Sentinel discovery.
    connecting: tokio::sync::Mutex<()>,
    prefix: String,
    /// Where, for messages (host:port or the Sentinel primary's name).
    describe: String,
    /// Never in a message; used to scrub one that quotes it.
    password: Option<keygate_secrets::SecretValue>,
    charge: Script,
    refund: Script,
    spent: Script,
    acquire: Script,
    /// The fast path: limiter key → refuse locally until.
    limited_until: Mutex<HashMap<String, Instant>>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").field("at", &self.describe).field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

fn setup(detail: impl Into<String>) -> LimitError {
    LimitError::Setup { store: "redis", detail: detail.into() }
}

impl RedisStore {
    /// Builds the client from `config` (resolving the password reference through `secrets`).
    /// Connects lazily: a Redis that is down at start makes keygate start all the same, with
    /// budgets failing closed until it answers.
    pub async fn connect(
        config: &RedisStoreConfig,
        timeout: Duration,
        secrets: &keygate_secrets::SecretStore,
    ) -> Result<RedisStore, LimitError> {
        let password = match &config.password {
            Some(reference) => {
                let reference: keygate_secrets::SecretRef = reference.parse().map_err(|_| {
                    setup(format!(
                        "`limit_store.redis.password` must be a secret reference ({})",
                        keygate_secrets::ACCEPTED_FORMS
                    ))
                })?;
                let secret = secrets.get(&reference).await.map_err(|error| {
                    setup(format!("cannot read `limit_store.redis.password` ({reference}): {error}"))
                })?;
                Some(keygate_secrets::SecretValue::new(secret.value.expose().to_owned()))
            }
            None => None,
        };
        let mut redis_info = RedisConnectionInfo::default().set_db(config.database);
        if let Some(username) = &config.username {
            redis_info = redis_info.set_username(username);
        }
        if let Some(password) = &password {
            redis_info = redis_info.set_password(password.expose());
        }
        let root_cert = match config.tls.as_ref().and_then(|tls| tls.ca_file.as_ref()) {
            Some(path) => Some(std::fs::read(path).map_err(|error| {
                setup(format!("cannot read `limit_store.redis.tls.ca_file` {}: {error}", path.display()))
            })?),
            None => None,
        };
        let certificates = || redis::TlsCertificates { client_tls: None, root_cert: root_cert.clone() };
        let tls = config.tls.is_some();
        let (target, describe) = match (&config.address, &config.sentinel) {
            (Some(address), _) => {
                let scheme = if tls { "rediss" } else { "redis" };
                let info: ConnectionInfo = format!("{scheme}://{address}")
                    .as_str()
                    .into_connection_info()
                    .map_err(|_| setup(format!("`limit_store.redis.address` `{address}` is not host:port")))?
                    .set_redis_settings(redis_info);
                let client = if tls { Client::build_with_tls(info, certificates()) } else { Client::open(info) }
                    .map_err(|error| setup(format!("cannot configure the client for {address}: {error}")))?;
                (Target::Standalone(client), address.clone())
            }
            (None, Some(sentinel)) => {
                let mut addresses = Vec::new();
                for address in &sentinel.addresses {
                    let (host, port) = address
                        .rsplit_once(':')
                        .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
                        .ok_or_else(|| setup(format!("sentinel address `{address}` is not host:port")))?;
                    addresses.push(if tls {
                        redis::ConnectionAddr::TcpTls { host, port, insecure: false, tls_params: None }
                    } else {
                        redis::ConnectionAddr::Tcp(host, port)
                    });
                }
                let mut builder = redis::sentinel::SentinelClientBuilder::new(
                    addresses,
                    &sentinel.master_name,
                    redis::sentinel::SentinelServerType::Master,
                )
                .map_err(|error| setup(format!("sentinel: {error}")))?
                .set_client_to_redis_db(config.database);
                if let Some(username) = &config.username {
                    builder = builder.set_client_to_redis_username(username);
                }
                if let Some(password) = &password {
                    builder = builder.set_client_to_redis_password(password.expose());
                }
                if tls {
                    builder = builder
                        .set_client_to_redis_tls_mode(redis::TlsMode::Secure)
                        .set_client_to_sentinel_tls_mode(redis::TlsMode::Secure)
                        .set_client_to_redis_certificates(certificates())
                        .set_client_to_sentinel_certificates(certificates());
                }
                let client = builder.build().map_err(|error| setup(format!("sentinel: {error}")))?;
                (
                    Target::Sentinel(tokio::sync::Mutex::new(client)),
                    format!("the Sentinel primary `{}`", sentinel.master_name),
                )
            }
            (None, None) => return Err(setup("set `limit_store.redis.address` or `limit_store.redis.sentinel`")),
        };
        let manager_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(timeout))
            .set_connection_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        Ok(RedisStore {
            target,
            manager_config,
            connection: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            prefix: config.key_prefix.clone(),
            describe,
            password,
            charge: Script::new(CHARGE),
            refund: Script::new(REFUND),
            spent: Script::new(SPENT),
            acquire: Script::new(ACQUIRE),
            limited_until: Mutex::new(HashMap::new()),
        })
    }

    fn error(&self, error: &redis::RedisError) -> LimitError {
        let mut detail = format!("{} at {}", error, self.describe);
        if let Some(password) = &self.password
            && !password.expose().is_empty()
        {
            detail = detail.replace(password.expose(), "[redacted]");
        }
        LimitError::Unavailable { store: "redis", detail }
    }

    async fn connection(&self) -> Result<ConnectionManager, LimitError> {
        if let Some(connection) = self.connection.lock().unwrap_or_else(PoisonError::into_inner).clone() {
            return Ok(connection);
        }
        let _one = self.connecting.lock().await;
        if let Some(connection) = self.connection.lock().unwrap_or_else(PoisonError::into_inner).clone() {
            return Ok(connection);
        }
        let client = match &self.target {
            Target::Standalone(client) => client.clone(),
            Target::Sentinel(sentinel) => {
                sentinel.lock().await.async_get_client().await.map_err(|error| self.error(&error))?
            }
        };
        let manager = ConnectionManager::new_lazy_with_config(client, self.manager_config.clone())
            .map_err(|error| self.error(&error))?;
        *self.connection.lock().unwrap_or_else(PoisonError::into_inner) = Some(manager.clone());
        Ok(manager)
    }

    /// Runs a script; on a connection-level error (or a read-only replica after a failover) the
    /// connection is dropped, so the next call connects (and asks Sentinel) afresh.
    async fn run<T: redis::FromRedisValue>(
        &self,
        invocation: &mut redis::ScriptInvocation<'_>,
    ) -> Result<T, LimitError> {
        let mut connection = self.connection().await?;
        match invocation.invoke_async::<T>(&mut connection).await {
            Ok(value) => Ok(value),
            Err(error) => {
                let read_only = error.code() == Some("READONLY");
                let connection_lost = error.is_io_error() || error.is_connection_dropped() || error.is_timeout();
                if read_only || (connection_lost && matches!(self.target, Target::Sentinel(_))) {
                    *self.connection.lock().unwrap_or_else(PoisonError::into_inner) = None;
                }
                Err(self.error(&error))
            }
        }
    }
}

#[async_trait]
impl LimitStore for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn charge(&self, request: &ChargeRequest) -> Result<ChargeOutcome, LimitError> {
        let key = format!("{}{}", self.prefix, request.key.storage_key());
        let amount = request.amount.max(0);
        let (exceeded, spent, slot): (i64, i64, i64) = self
            .run(
                self.charge
                    .key(&key)
                    .arg(amount)
                    .arg(request.max)
                    .arg(slot_micros(request.key.window))
                    .arg(if request.force { 1 } else { 0 })
                    .arg(SLOTS),
            )
            .await
            .and_then(|values: Vec<i64>| match values.as_slice() {
                [a, b, c] => Ok((*a, *b, *c)),
                _ => Err(LimitError::Unavailable {
                    store: "redis",
                    detail: "the charge script returned an unexpected reply".into(),
                }),
            })?;
        Ok(ChargeOutcome {
            spent_before: spent,
            exceeded: exceeded == 1,
            charge: u64::try_from(slot).ok().map(|slot| Charge { key: request.key.clone(), slot, amount }),
        })
    }

    async fn refund(&self, charge: &Charge) -> Result<(), LimitError> {
        if charge.amount <= 0 {
            return Ok(());
        }
        let key = format!("{}{}", self.prefix, charge.key.storage_key());
        let _: i64 = self.run(self.refund.key(&key).arg(charge.slot).arg(charge.amount)).await?;
        Ok(())
    }

    async fn spent(&self, key: &BudgetKey) -> Result<i64, LimitError> {
        let storage = format!("{}{}", self.prefix, key.storage_key());
        self.run(self.spent.key(&storage).arg(slot_micros(key.window)).arg(SLOTS)).await
    }

    async fn acquire(&self, service: &str, rate: RateSpec) -> Result<RateOutcome, LimitError> {
        let key = format!("{}{}", self.prefix, rate.storage_key(service));
        let now = Instant::now();
        {
            let mut limited = self.limited_until.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(until) = limited.get(&key).copied() {
                if until > now {
                    return Ok(RateOutcome::Limited { retry_after: until - now });
                }
                limited.remove(&key);
            }
        }
        let values: Vec<i64> = self
            .run(self.acquire.key(&key).arg(emission_interval_micros(rate.per_second)).arg(rate.burst.max(1)))
            .await?;
        match values.as_slice() {
            [1, _] => Ok(RateOutcome::Allowed),
            [_, retry] => {
                let retry_after = Duration::from_micros(u64::try_from(*retry).unwrap_or(0));
                let mut limited = self.limited_until.lock().unwrap_or_else(PoisonError::into_inner);
                if limited.len() > 4096 {
                    limited.retain(|_, until| *until > now);
                }
                limited.insert(key, now + retry_after);
                Ok(RateOutcome::Limited { retry_after })
            }
            _ => Err(LimitError::Unavailable {
                store: "redis",
                detail: "the rate-limit script returned an unexpected reply".into(),
            }),
        }
    }

    async fn ping(&self) -> Result<(), LimitError> {
        let mut connection = self.connection().await?;
        let result: Result<String, _> = redis::cmd("PING").query_async(&mut connection).await;
        match result {
            Ok(_) => Ok(()),
            Err(error) => {
                if matches!(self.target, Target::Sentinel(_)) {
                    *self.connection.lock().unwrap_or_else(PoisonError::into_inner) = None;
                }
                Err(self.error(&error))
            }
        }
    }
}
