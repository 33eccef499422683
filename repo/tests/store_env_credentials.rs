//! S3 credentials from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
//! AWS_SESSION_TOKEN). Its own test binary with one test: it sets process-wide
//! environment variables, which no other test may race with.

mod common;

use bytes::Bytes;
use cdp_repo::store::{Store, StoreError};
use common::S3Server;

#[tokio::test]
async fn s3_credentials_from_the_environment() {
    let server = S3Server::start(&["env-bucket"]);
    let (id, secret) = server.enable_auth();
    let url = server.url("env-bucket", "p");

    // A key id without a secret is a configuration error.
    std::env::remove_var("AWS_PROFILE");
    std::env::remove_var("AWS_SECRET_ACCESS_KEY");
    std::env::remove_var("AWS_SESSION_TOKEN");
    std::env::set_var("AWS_ACCESS_KEY_ID", &id);
    let e = Store::open(&url, None).unwrap_err();
    assert!(matches!(e, StoreError::Config { .. }), "{e:?}");
    assert!(
        e.to_string().contains("AWS_SECRET_ACCESS_KEY is not"),
        "{e}"
    );

    std::env::set_var("AWS_SECRET_ACCESS_KEY", &secret);
    let s = Store::open(&url, None).unwrap();
    s.check().await.unwrap();
    s.put("k", Bytes::from_static(b"env")).await.unwrap();
    assert_eq!(s.get("k").await.unwrap(), Bytes::from_static(b"env"));

    // A credentials file named in the target wins over the environment.
    let bad = server.credentials_file("AKIANOTAKEY000000000", "nope");
    let s = Store::open(&url, Some(&bad)).unwrap();
    assert!(matches!(s.check().await, Err(StoreError::Auth { .. })));

    // A wrong secret in the environment: Auth, not a transient error.
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "wrong");
    let s = Store::open(&url, None).unwrap();
    let e = s.check().await.unwrap_err();
    assert!(matches!(e, StoreError::Auth { .. }), "{e:?}");
    assert!(!e.is_transient());
}
