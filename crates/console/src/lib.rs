//! beckon-console
