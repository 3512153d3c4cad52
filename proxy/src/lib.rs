//! keygate proxy.
