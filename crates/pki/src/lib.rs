//! beckon-pki
