//! keygate policies: the per-service policy model, the Stripe operation table and `decide()`.
//! Pure: no I/O on the request path.
