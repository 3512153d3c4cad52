//! Harness for keygate's end-to-end tests: starts real servers on free ports.
