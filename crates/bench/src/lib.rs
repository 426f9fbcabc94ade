//! beckon-bench
