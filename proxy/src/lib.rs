//! keygate: a zero-trust egress proxy for the Stripe API.
//!
//! Services point their Stripe SDK at keygate and hold only a keygate service token; keygate
//! authenticates the service, applies its policy, injects the real Stripe key fetched at runtime,
//! forwards the call to the right Stripe host and records the exchange.
//!
//! Modules: [`config`] (typed configuration), [`server`] and [`admin`] (listeners),
//! [`pipeline`] (the request phases), [`budget`] (the bound on buffered request bytes),
//! [`limiting`] (rate limits and money budgets in the limit store), [`auth`],
//! [`upstream`], [`routing`], [`headers`], [`error`] (the one place errors become responses),
//! [`telemetry`], [`anomalies`] (live anomaly detection off the request path), [`quickstart`],
//! [`run`] (assembling and running everything).

pub mod admin;
pub mod anomalies;
pub mod auth;
pub mod budget;
pub mod config;
pub mod error;
pub mod gateway;
pub mod headers;
pub mod limiting;
pub mod pipeline;
pub mod quickstart;
pub mod reconcile;
pub mod reply;
pub mod routing;
pub mod run;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod webhook_cli;
pub mod webhook_journal;
