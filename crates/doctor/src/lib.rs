//! beckon-doctor
