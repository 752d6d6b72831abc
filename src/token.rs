//! Owns internal tokens: minting new ones and rendering the `[[keys]]` stanza that stores
//! only their hash.

use base64::Engine;
use ring::rand::SecureRandom;

use crate::auth::sha256_hex;
use crate::scope::Scopes;

/// A new token: `kg_<env>_` and 32 random bytes in URL-safe base64. The prefix lets secret
/// scanners and people recognise a keygate token and its environment.
pub fn new_token(env: &str) -> Result<String, String> {
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| "the system random generator failed".to_string())?;
    let env: String = env.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
    Ok(format!(
        "kg_{env}_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    ))
}

pub struct KeyStanza<'a> {
    pub id: &'a str,
    pub team: &'a str,
    pub token: &'a str,
    pub scopes: Scopes,
    pub env: &'a str,
    pub expires: Option<&'a str>,
}

impl KeyStanza<'_> {
    pub fn render(&self) -> String {
        let scopes: Vec<String> = self
            .scopes
            .names()
            .iter()
            .map(|s| format!("\"{s}\""))
            .collect();
        let mut out = format!(
            "[[keys]]\nid = {:?}\nteam = {:?}\ntoken_sha256 = \"{}\"\nscopes = [{}]\nenv = {:?}\n",
            self.id,
            self.team,
            sha256_hex(self.token.as_bytes()),
            scopes.join(", "),
            self.env
        );
        if let Some(expires) = self.expires {
            out.push_str(&format!("expires = {expires:?}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scope::Scope;

    #[test]
    fn tokens_are_unique_and_well_formed() {
        let a = new_token("prod").unwrap();
        let b = new_token("prod").unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("kg_prod_"));
        assert_eq!(a.len(), "kg_prod_".len() + 43);
    }

    #[test]
    fn stanza_holds_the_hash_not_the_token() {
        let token = new_token("dev").unwrap();
        let stanza = KeyStanza {
            id: "k1",
            team: "design",
            token: &token,
            scopes: [Scope::Read].into_iter().collect(),
            env: "dev",
            expires: None,
        }
        .render();
        assert!(!stanza.contains(&token));
        assert!(stanza.contains(&sha256_hex(token.as_bytes())));
        assert!(stanza.contains("scopes = [\"read\"]"));
    }
}
