//! Opening a remote primary where the platform's root certificates cannot be loaded
//! (`SSL_CERT_FILE` naming a file that does not exist, a common container mistake). A test
//! binary of its own: the variable is process-wide. hyper-rustls 0.25's native-roots loader
//! panicked inside `open`; a plain `http://` primary, which needs no certificate, did not open.
#![cfg(feature = "remote")]

#[allow(dead_code)] // this test uses only the server's start and url
mod support;

use dotdo_core::{ErrorKind, HotStore, ObjectId};
use dotdo_libsql::LibsqlStore;
use support::hrana::HranaServer;

#[tokio::test]
async fn a_primary_opens_or_fails_typed_without_root_certificates() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Set before any thread of this binary loads certificates (the only test here).
    std::env::set_var("SSL_CERT_FILE", dir.path().join("no-such-bundle.pem"));
    std::env::remove_var("SSL_CERT_DIR");
    // Plain HTTP needs no certificate: it opens and works.
    let server = HranaServer::start(&dir.path().join("primary.db"), "tok");
    let store = LibsqlStore::remote(server.url(), "tok").open().await.expect("an http:// primary opens");
    let o = ObjectId::new("o").expect("id");
    assert_eq!(store.object_info(&o).await.expect("info"), None);
    // TLS does: a typed, non-retryable error naming the variables, no panic.
    let e = LibsqlStore::remote("https://127.0.0.1:9", "tok").open().await.expect_err("no roots for TLS");
    assert_eq!(e.kind(), &ErrorKind::Backend, "{e}");
    assert!(!e.is_retryable(), "{e}");
    assert!(e.to_string().contains("SSL_CERT_FILE") && e.to_string().contains("no-such-bundle.pem"), "{e}");
}
