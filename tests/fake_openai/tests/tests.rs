//! The fake server's tests over real HTTP, one test binary (as promptmill's own): a module
//! per part of the server, beside this file.

mod common;

mod anthropic;
mod batch;
mod gemini;
mod server;
mod shape;
