//! beckon-identity
