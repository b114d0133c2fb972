//! The agent: a pure state machine ([`machine`]) and the runtime that feeds it events and
//! carries out its effects ([`run`]).

pub mod machine;
pub mod run;

#[cfg(test)]
mod tests;
