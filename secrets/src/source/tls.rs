//! rustls client configuration on the workspace crypto provider (`ring`).
