//! A reader connection that cannot be opened because the process is out of file descriptors:
//! the read is a retryable `Unavailable` (the kit's check). Its own test binary: it uses up
//! every file descriptor of the process.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_cannot_be_opened_for_want_of_descriptors_is_retryable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dotdo_sqlite::SqliteStore::builder(dir.path().join("hot.db")).open().await.expect("open");
    dotdo_core::testkit::assert_reads_without_descriptors_are_retryable(&store).await;
}
