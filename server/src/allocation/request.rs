//! Validation of an Allocate request, before anything touches the database.

use switchboard_proto::v1::AllocateRequest;

use crate::{config::AllocationConfig, error::ApiError};

/// A validated Allocate request.
pub struct AllocationInput {
    /// Distinct region names, in the client's order.
    pub regions: Vec<String>,
    pub app: String,
    pub client_version: semver::Version,
    pub client_data_json: String,
    pub config_encryption_token: String,
}

const MAX_NAME_LEN: usize = 64;
const MAX_TOKEN_LEN: usize = 4096;

/// Names of regions and apps: lower-case letters, digits, `-`, `_`, `.`.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'))
}

pub fn validate_request(request: AllocateRequest, config: &AllocationConfig) -> Result<AllocationInput, ApiError> {
    if request.regions.is_empty() {
        return Err(ApiError::InvalidRequest("regions must name at least one region".into()));
    }
    if request.regions.len() > config.max_regions {
        return Err(ApiError::InvalidRequest(format!("at most {} regions may be requested", config.max_regions)));
    }
    let mut regions: Vec<String> = Vec::with_capacity(request.regions.len());
    for region in request.regions {
        if !is_valid_name(&region) {
            return Err(ApiError::InvalidRequest(format!("region name {region:?} is not valid")));
        }
        if !regions.contains(&region) {
            regions.push(region);
        }
    }
    if !is_valid_name(&request.app) {
        return Err(ApiError::InvalidRequest(format!("app name {:?} is not valid", request.app)));
    }
    let client_version = semver::Version::parse(request.client_version.trim()).map_err(|_| {
        ApiError::InvalidRequest(format!("client_version {:?} is not a semantic version", request.client_version))
    })?;
    if request.client_data_json.len() > config.max_client_data_bytes {
        return Err(ApiError::InvalidRequest(format!(
            "client data is {} bytes; at most {} are allowed",
            request.client_data_json.len(),
            config.max_client_data_bytes
        )));
    }
    let client_data_json = if request.client_data_json.trim().is_empty() {
        "{}".to_owned()
    } else {
        match serde_json::from_str::<serde_json::Value>(&request.client_data_json) {
            Ok(serde_json::Value::Object(_)) => request.client_data_json,
            _ => {
                return Err(ApiError::InvalidRequest("client data must be a JSON object".into()));
            }
        }
    };
    if request.config_encryption_token.len() > MAX_TOKEN_LEN {
        return Err(ApiError::InvalidRequest("config encryption token is too long".into()));
    }
    Ok(AllocationInput {
        regions,
        app: request.app,
        client_version,
        client_data_json,
        config_encryption_token: request.config_encryption_token,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn request() -> AllocateRequest {
        AllocateRequest {
            regions: vec!["us-east-1".into(), "us-west-1".into(), "us-east-1".into()],
            app: "chrome".into(),
            client_version: "3.1.0".into(),
            client_data_json: r#"{"timezone":"Europe/Paris"}"#.into(),
            config_encryption_token: "secret".into(),
        }
    }

    fn reason(result: Result<AllocationInput, ApiError>) -> String {
        match result {
            Ok(_) => "ok".into(),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn accepts_and_deduplicates_regions_in_order() {
        let input = validate_request(request(), &AllocationConfig::default()).unwrap();
        assert_eq!(input.regions, vec!["us-east-1", "us-west-1"]);
        assert_eq!(input.client_version, semver::Version::new(3, 1, 0));
    }

    #[test]
    fn refuses_bad_input() {
        let config = AllocationConfig::default();
        let mut empty = request();
        empty.regions.clear();
        assert!(reason(validate_request(empty, &config)).contains("at least one region"));
        let mut bad_region = request();
        bad_region.regions = vec!["US EAST; drop".into()];
        assert!(reason(validate_request(bad_region, &config)).contains("not valid"));
        let mut bad_version = request();
        bad_version.client_version = "three".into();
        assert!(reason(validate_request(bad_version, &config)).contains("semantic version"));
        let mut not_object = request();
        not_object.client_data_json = "[1,2]".into();
        assert!(reason(validate_request(not_object, &config)).contains("JSON object"));
        let mut oversized = request();
        oversized.client_data_json = format!(r#"{{"x":"{}"}}"#, "a".repeat(config.max_client_data_bytes));
        assert!(reason(validate_request(oversized, &config)).contains("bytes"));
        let mut too_many = request();
        too_many.regions = (0..=config.max_regions).map(|i| format!("r{i}")).collect();
        assert!(reason(validate_request(too_many, &config)).contains("at most"));
    }
}
