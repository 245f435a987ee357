//! One ACME order, start to finish: the account (made once and kept in `.acme/accounts/`),
//! a new order for the certificate's hosts, each authorization's challenge published and
//! answered, the CSR for a fresh key, the chain. What a failure says comes back with the
//! CA's problem document, for the log line. Never writes the issued certificate itself
//! (the manager does, under the lock) and never logs key material.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, ExternalAccountKey, Identifier, NewAccount,
    NewOrder, OrderStatus, Problem, RetryPolicy,
};

use super::{challenges, store, ChallengeKind, Issuer, KeyType, ManagedCert};

/// Why an order failed: where, what, and the CA's problem document when it sent one.
#[derive(Debug, Clone)]
pub struct Failure {
    pub stage: &'static str,
    pub message: String,
    pub problem: Option<Problem>,
}

impl Failure {
    fn new(stage: &'static str, message: impl Into<String>) -> Failure {
        Failure {
            stage,
            message: message.into(),
            problem: None,
        }
    }

    fn acme(stage: &'static str) -> impl FnOnce(instant_acme::Error) -> Failure {
        move |e| match e {
            instant_acme::Error::Api(p) => Failure {
                stage,
                message: p.to_string(),
                problem: Some(p),
            },
            other => Failure::new(stage, with_sources(&other)),
        }
    }
}

/// An error with the errors under it (`client error (Connect): tcp connect error:
/// Connection refused`), so the log says what actually failed.
fn with_sources(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        next = s.source();
    }
    text
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.stage, self.message)
    }
}

/// A certificate the CA issued: the PEM chain (leaf first) and its new key.
pub struct Issued {
    pub chain_pem: String,
    pub key_pem: String,
}

/// How long the CA gets to validate the challenges, and then to issue.
const POLL: RetryPolicy = RetryPolicy::new()
    .initial_delay(Duration::from_millis(250))
    .backoff(1.5)
    .timeout(Duration::from_secs(120));

/// The account for `issuer`: the one stored in `state_dir`, or a new one (then stored).
pub async fn account(issuer: &Issuer, state_dir: &Path) -> Result<Account, Failure> {
    let path = store::account_path(state_dir, &issuer.directory);
    let builder = || match &issuer.ca_certificates {
        Some(ca) => Account::builder_with_root(ca),
        None => Account::builder(),
    };
    if let Some(creds) = store::read_account(&path).map_err(|e| Failure::new("account", e))? {
        return builder()
            .map_err(Failure::acme("account"))?
            .from_credentials(creds)
            .await
            .map_err(Failure::acme("account"));
    }
    let contact: Vec<&str> = issuer.contact.iter().map(String::as_str).collect();
    let eab = issuer
        .eab
        .as_ref()
        .map(|e| ExternalAccountKey::new(e.key_id.clone(), &e.hmac_key));
    let (account, creds) = builder()
        .map_err(Failure::acme("new account"))?
        .create(
            &NewAccount {
                contact: &contact,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            issuer.directory.clone(),
            eab.as_ref(),
        )
        .await
        .map_err(Failure::acme("new account"))?;
    store::write_account(&path, &creds).map_err(|e| Failure::new("new account", e))?;
    tracing::info!(
        issuer = %issuer.name,
        directory = %issuer.directory,
        account = account.id(),
        file = %path.display(),
        "ACME account created"
    );
    Ok(account)
}

/// Challenge answers this order published; taken down when the order is over, however
/// it ends.
struct Published {
    state_dir: std::path::PathBuf,
    http01: Vec<String>,
    tls_alpn01: Vec<String>,
}

impl Published {
    fn http01(&mut self, token: &str, key_authorization: &str) -> Result<(), Failure> {
        challenges().put_http01(token, key_authorization);
        self.http01.push(token.to_string());
        store::write_atomic(
            &store::http01_path(&self.state_dir, token),
            key_authorization.as_bytes(),
            false,
        )
        .map_err(|e| Failure::new("challenge", e))
    }

    fn tls_alpn01(&mut self, host: &str, digest: &[u8]) -> Result<(), Failure> {
        let (cert_pem, key_pem) =
            tls_alpn01_cert(host, digest).map_err(|e| Failure::new("challenge", e))?;
        let path = store::tls_alpn01_path(&self.state_dir, host);
        let both = format!("{cert_pem}{key_pem}");
        let key =
            super::challenge_key(both.as_bytes()).map_err(|e| Failure::new("challenge", e))?;
        challenges().put_tls_alpn01(host, Arc::new(key));
        self.tls_alpn01.push(host.to_string());
        store::write_atomic(&path, both.as_bytes(), true).map_err(|e| Failure::new("challenge", e))
    }
}

impl Drop for Published {
    fn drop(&mut self) {
        for token in &self.http01 {
            challenges().remove_http01(token);
            let _ = std::fs::remove_file(store::http01_path(&self.state_dir, token));
        }
        for host in &self.tls_alpn01 {
            challenges().remove_tls_alpn01(host);
            let _ = std::fs::remove_file(store::tls_alpn01_path(&self.state_dir, host));
        }
    }
}

/// The self-signed certificate that answers a TLS-ALPN-01 challenge for `host`: the
/// host as its only SAN and the key authorization's digest in the critical
/// acmeIdentifier extension (RFC 8737 3).
fn tls_alpn01_cert(host: &str, digest: &[u8]) -> Result<(String, String), String> {
    let mut params = rcgen::CertificateParams::new(vec![host.to_string()])
        .map_err(|e| format!("cannot make the TLS-ALPN-01 certificate: {e}"))?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate().map_err(|e| format!("cannot make a key: {e}"))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| format!("cannot make the TLS-ALPN-01 certificate: {e}"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A fresh key of `kind` for the certificate. (An RSA key takes a noticeable fraction of
/// a second: the caller makes it off the async threads.)
fn new_key(kind: KeyType) -> Result<rcgen::KeyPair, String> {
    let alg = match kind {
        KeyType::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        KeyType::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        KeyType::Rsa2048 => return new_rsa_key(2048),
    };
    rcgen::KeyPair::generate_for(alg).map_err(|e| format!("cannot make a key: {e}"))
}

/// An RSA key of `bits`, made by RustCrypto's `rsa` (ring cannot make RSA keys) and
/// handed to rcgen as PKCS#8 to sign the CSR with RSASSA-PKCS1-v1_5 SHA-256.
fn new_rsa_key(bits: usize) -> Result<rcgen::KeyPair, String> {
    use rsa::pkcs8::EncodePrivateKey;
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, bits)
        .map_err(|e| format!("cannot make an RSA key: {e}"))?;
    let der = key
        .to_pkcs8_der()
        .map_err(|e| format!("cannot encode the RSA key: {e}"))?;
    let pkcs8 = rustls_pki_types::PrivatePkcs8KeyDer::from(der.as_bytes());
    rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_RSA_SHA256)
        .map_err(|e| format!("cannot use the RSA key: {e}"))
}

/// Orders a certificate for `cert.hosts` (one certificate, every host a SAN) and waits
/// for it.
pub async fn issue(cert: &ManagedCert, account: &Account) -> Result<Issued, Failure> {
    let ids: Vec<Identifier> = cert
        .hosts
        .iter()
        .map(|h| Identifier::Dns(h.clone()))
        .collect();
    let mut order = account
        .new_order(&NewOrder::new(&ids))
        .await
        .map_err(Failure::acme("new order"))?;
    let mut published = Published {
        state_dir: cert.state_dir.clone(),
        http01: Vec::new(),
        tls_alpn01: Vec::new(),
    };
    let wanted = match cert.issuer.challenge {
        ChallengeKind::Http01 => ChallengeType::Http01,
        ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
    };
    {
        let mut authorizations = order.authorizations();
        while let Some(a) = authorizations.next().await {
            let mut a = a.map_err(Failure::acme("authorization"))?;
            match a.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => {
                    return Err(Failure::new(
                        "authorization",
                        format!("the authorization for {} is {other:?}", a.identifier()),
                    ))
                }
            }
            let host = a.identifier().to_string();
            let Some(mut challenge) = a.challenge(wanted.clone()) else {
                return Err(Failure::new(
                    "authorization",
                    format!(
                        "the CA offers no {} challenge for {host}",
                        cert.issuer.challenge.name()
                    ),
                ));
            };
            let key_authorization = challenge.key_authorization();
            match cert.issuer.challenge {
                ChallengeKind::Http01 => {
                    published.http01(&challenge.token, key_authorization.as_str())?
                }
                ChallengeKind::TlsAlpn01 => {
                    published.tls_alpn01(&host, key_authorization.digest().as_ref())?
                }
            }
            challenge
                .set_ready()
                .await
                .map_err(Failure::acme("challenge"))?;
        }
    }
    let status = order
        .poll_ready(&POLL)
        .await
        .map_err(Failure::acme("validation"))?;
    if status != OrderStatus::Ready {
        return Err(validation_failure(&mut order).await);
    }
    drop(published);
    let kind = cert.issuer.key_type;
    let key = tokio::task::spawn_blocking(move || new_key(kind))
        .await
        .map_err(|e| Failure::new("finalize", format!("key task failed: {e}")))?
        .map_err(|e| Failure::new("finalize", e))?;
    let mut params = rcgen::CertificateParams::new(cert.hosts.clone())
        .map_err(|e| Failure::new("finalize", format!("cannot make the CSR: {e}")))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params
        .serialize_request(&key)
        .map_err(|e| Failure::new("finalize", format!("cannot make the CSR: {e}")))?;
    order
        .finalize_csr(csr.der())
        .await
        .map_err(Failure::acme("finalize"))?;
    let chain_pem = order
        .poll_certificate(&POLL)
        .await
        .map_err(Failure::acme("certificate"))?;
    Ok(Issued {
        chain_pem,
        key_pem: key.serialize_pem(),
    })
}

/// The order went invalid: the problem document of the first challenge that failed (the
/// CA's account of what it fetched and why it was wrong), else the order's own.
async fn validation_failure(order: &mut instant_acme::Order) -> Failure {
    let order_problem = order.state().error.clone();
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut a)) = authorizations.next().await {
        let host = a.identifier().to_string();
        if a.refresh().await.is_err() {
            continue;
        }
        if let Some(p) = a.challenges.iter().find_map(|c| c.error.clone()) {
            return Failure {
                stage: "validation",
                message: format!("{host}: {p}"),
                problem: Some(p),
            };
        }
    }
    match order_problem {
        Some(p) => Failure {
            stage: "validation",
            message: p.to_string(),
            problem: Some(p),
        },
        None => Failure::new("validation", "the order became invalid"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_alpn01_certificate_carries_the_digest() {
        let digest = [7u8; 32];
        let (cert_pem, _) = tls_alpn01_cert("a.test", &digest).unwrap();
        use rustls_pki_types::pem::PemObject;
        let der = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        // id-pe-acmeIdentifier, critical, an OCTET STRING of the SHA-256 digest.
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier extension");
        assert!(ext.critical);
        assert_eq!(&ext.value[2..], &digest);
    }
}
