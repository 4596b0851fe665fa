//! EC2 through aws-sdk-ec2: one client per region (cached), instances tagged
//! with the cluster and host id, user data rendered from
//! `deploy/ec2-user-data.sh.tmpl`, idempotent launches, retries with
//! exponential backoff on throttling, and fallback instance types when EC2
//! refuses one (no capacity, not offered).
//!
//! The SDK sits behind a small seam ([`Ec2Api`]) so that the retry and fallback
//! logic is unit-tested with a hand-written fake; the SDK implementation is
//! tested against an EC2 emulator (moto) in `tests/tests/cloud_ec2.rs`.
//!
//! Idempotency: each host's RunInstances carries a `ClientToken` derived from
//! (launch token, host id, instance type), and every instance is tagged with the
//! launch token; a launch first lists the instances already tagged with its
//! token and launches only the hosts that are missing. So a launch repeated
//! after a timeout, or after a fallback to another type, never doubles a host.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use aws_sdk_ec2::{
    Client,
    config::{BehaviorVersion, Credentials, Region, retry::RetryConfig, timeout::TimeoutConfig},
    error::{DisplayErrorContext, ProvideErrorMetadata, SdkError},
    types::{Filter, IamInstanceProfileSpecification, InstanceType, ResourceType, Tag, TagSpecification},
};
use base64::{Engine, engine::general_purpose::STANDARD};
use chrono::{DateTime, Utc};
use futures::{StreamExt, stream};
use rand::Rng;
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use super::{
    CloudError, CloudProvider, Instance, InstanceState, LaunchRequest, TAG_CLUSTER, TAG_HOST_ID, TAG_LAUNCH_TOKEN,
    TypeRefusal, config::CloudConfig, config::RegionCloudConfig, validate_launch,
};
use crate::auth::host_credential::HostCredentials;

/// The built-in user data template.
pub const USER_DATA_TEMPLATE: &str = include_str!("../../../deploy/ec2-user-data.sh.tmpl");
/// The systemd unit the user data installs.
pub const HOSTAGENT_UNIT: &str = include_str!("../../../deploy/hostagent.service");

const CODE_TIMEOUT: &str = "Timeout";
const CODE_TRANSPORT: &str = "Transport";
/// EC2 takes at most 16 KiB of user data (before base64).
const MAX_USER_DATA: usize = 16 * 1024;
/// EC2 accepts at most 1,000 ids per TerminateInstances.
const TERMINATE_BATCH: usize = 500;

/// An EC2 error: its code (`RequestLimitExceeded`, …) and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiError {
    pub(crate) code: String,
    pub(crate) message: String,
}

impl ApiError {
    pub(crate) fn new(code: &str, message: impl Into<String>) -> Self {
        ApiError { code: code.to_owned(), message: message.into() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ErrorClass {
    /// Retried with backoff.
    Throttled,
    /// Retried with backoff (transport errors, EC2 server errors).
    Transient,
    /// The instance type is refused here: try the next one.
    Capacity,
    NotFound,
    Unauthorized,
    Other,
}

fn classify(code: &str) -> ErrorClass {
    match code {
        "RequestLimitExceeded" | "Throttling" | "ThrottlingException" | "RequestThrottled" => ErrorClass::Throttled,
        CODE_TIMEOUT | CODE_TRANSPORT | "InternalError" | "InternalFailure" | "ServiceUnavailable" | "Unavailable" => {
            ErrorClass::Transient
        }
        "InsufficientInstanceCapacity"
        | "InsufficientHostCapacity"
        | "InsufficientReservedInstanceCapacity"
        | "InsufficientCapacity"
        | "InsufficientCapacityOnHost"
        | "Unsupported"
        | "InstanceLimitExceeded"
        | "VcpuLimitExceeded"
        | "InvalidInstanceType"
        | "InvalidInstanceType.NotFound" => ErrorClass::Capacity,
        "InvalidInstanceID.NotFound" => ErrorClass::NotFound,
        "AuthFailure"
        | "UnauthorizedOperation"
        | "InvalidClientTokenId"
        | "SignatureDoesNotMatch"
        | "OptInRequired"
        | "Blocked"
        | "PendingVerification"
        | "InvalidAMIID.NotFound"
        | "InvalidAMIID.Malformed"
        | "InvalidAMIID.Unavailable" => ErrorClass::Unauthorized,
        _ => ErrorClass::Other,
    }
}

/// One RunInstances call: one instance.
#[derive(Debug, Clone)]
pub(crate) struct RunSpec {
    pub(crate) image: String,
    pub(crate) instance_type: String,
    /// Already base64-encoded.
    pub(crate) user_data: String,
    pub(crate) client_token: String,
    pub(crate) tags: Vec<(String, String)>,
    pub(crate) subnet_id: String,
    pub(crate) security_group_ids: Vec<String>,
    pub(crate) instance_profile: String,
}

/// The EC2 calls Switchboard makes. One implementation on aws-sdk-ec2, one fake in unit tests.
#[async_trait]
pub(crate) trait Ec2Api: Send + Sync {
    async fn run_instance(&self, region: &str, spec: &RunSpec) -> Result<Instance, ApiError>;
    /// DescribeInstances with filters (name, values), every page.
    async fn describe_instances(
        &self,
        region: &str,
        filters: &[(String, Vec<String>)],
    ) -> Result<Vec<Instance>, ApiError>;
    async fn terminate_instances(&self, region: &str, instance_ids: &[String]) -> Result<(), ApiError>;
}

/// Exponential backoff with jitter for throttled and transient errors.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RetryPolicy {
    pub(crate) max_attempts: u32,
    pub(crate) initial: Duration,
    pub(crate) max: Duration,
}

impl RetryPolicy {
    /// Delay before attempt `attempt + 1` (attempt counts from 1): between half
    /// and all of `initial × 2^(attempt-1)`, capped at `max`.
    fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.initial.saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1))).min(self.max);
        let half = ceiling / 2;
        let jitter = rand::thread_rng().gen_range(0..=half.as_millis().max(1) as u64);
        half + Duration::from_millis(jitter)
    }
}

/// Values substituted into the user data template. Debug hides the credential.
pub struct UserDataValues<'a> {
    pub endpoint: &'a str,
    pub host_id: &'a str,
    pub region: &'a str,
    pub image: &'a str,
    pub capacity: u32,
    pub cluster: &'a str,
    pub credential: &'a str,
}

/// Renders the user data script. Values must be single-line and free of
/// quotes, backslashes and `$` (they land in an environment file).
pub fn render_user_data(template: &str, values: &UserDataValues<'_>) -> Result<String, CloudError> {
    let capacity = values.capacity.to_string();
    let pairs = [
        ("endpoint", values.endpoint),
        ("host_id", values.host_id),
        ("region", values.region),
        ("image", values.image),
        ("capacity", capacity.as_str()),
        ("cluster", values.cluster),
        ("credential", values.credential),
    ];
    let mut out = template.to_owned();
    for (name, value) in pairs {
        if value.is_empty() || value.chars().any(|c| c.is_control() || "'\"\\$`".contains(c)) {
            // Never echo the value: it may be the credential.
            return Err(CloudError::Invalid(format!("user data value {name} is empty or has unsafe characters")));
        }
        out = out.replace(&format!("{{{{{name}}}}}"), value);
    }
    out = out.replace("{{hostagent_unit}}", HOSTAGENT_UNIT.trim_end());
    if out.len() > MAX_USER_DATA {
        return Err(CloudError::Invalid(format!(
            "user data is {} bytes, EC2 takes at most {MAX_USER_DATA}",
            out.len()
        )));
    }
    if let Some(at) = out.find("{{") {
        let rest: String = out[at..].chars().take(40).collect();
        return Err(CloudError::Invalid(format!("user data template has an unknown placeholder near {rest:?}")));
    }
    Ok(out)
}

/// ClientToken of one host's RunInstances with one instance type (≤ 64 ascii characters).
fn client_token(token: &str, host_id: &str, instance_type: &str) -> String {
    let digest = Sha256::digest(format!("{token}\n{host_id}\n{instance_type}").as_bytes());
    hex::encode(digest)
}

/// The EC2 [`CloudProvider`].
pub struct Ec2Provider {
    api: Arc<dyn Ec2Api>,
    /// Control-plane URL the hosts connect to.
    endpoint: String,
    credentials: HostCredentials,
    template: String,
    regions: BTreeMap<String, RegionCloudConfig>,
    retry: RetryPolicy,
    launch_concurrency: usize,
}

impl Ec2Provider {
    /// An EC2 provider from the `[cloud]` section. `endpoint` is the URL hosts
    /// connect to; `credentials` issue each host's credential.
    pub fn new(config: &CloudConfig, endpoint: String, credentials: HostCredentials) -> Result<Self, CloudError> {
        let ec2 = &config.ec2;
        let static_credentials = match (ec2.access_key_id.is_empty(), ec2.secret_access_key.is_empty()) {
            (true, true) => None,
            (false, false) => Some(Credentials::new(
                ec2.access_key_id.expose(),
                ec2.secret_access_key.expose(),
                None,
                None,
                "switchboard-config",
            )),
            _ => {
                return Err(CloudError::Invalid(
                    "set both cloud.ec2.access_key_id and secret_access_key, or neither".into(),
                ));
            }
        };
        let template = match &ec2.user_data_template {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| CloudError::Invalid(format!("reading user data template {}: {e}", path.display())))?,
            None => USER_DATA_TEMPLATE.to_owned(),
        };
        let api = SdkApi {
            endpoint_url: (!ec2.endpoint_url.is_empty()).then(|| ec2.endpoint_url.clone()),
            static_credentials,
            shared: tokio::sync::OnceCell::new(),
            clients: Mutex::new(HashMap::new()),
        };
        let retry = RetryPolicy {
            max_attempts: ec2.max_attempts.max(1),
            initial: ec2.initial_backoff(),
            max: ec2.max_backoff(),
        };
        Ok(Self::with_api(Arc::new(api), config, endpoint, credentials, template, retry))
    }

    pub(crate) fn with_api(
        api: Arc<dyn Ec2Api>,
        config: &CloudConfig,
        endpoint: String,
        credentials: HostCredentials,
        template: String,
        retry: RetryPolicy,
    ) -> Self {
        Ec2Provider {
            api,
            endpoint,
            credentials,
            template,
            regions: config.regions.clone(),
            retry,
            launch_concurrency: config.ec2.launch_concurrency.max(1),
        }
    }

    /// Runs `call` until it succeeds, fails for good, or the attempts run out
    /// (throttled and transient errors are retried with backoff).
    async fn with_retries<T, F, Fut>(&self, region: &str, operation: &'static str, mut call: F) -> Result<T, CloudError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ApiError>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let error = match call().await {
                Ok(value) => return Ok(value),
                Err(error) => error,
            };
            let class = classify(&error.code);
            let retry = matches!(class, ErrorClass::Throttled | ErrorClass::Transient);
            if !retry || attempt >= self.retry.max_attempts {
                return Err(to_cloud_error(region, error, class, attempt));
            }
            let delay = self.retry.delay(attempt);
            warn!(region, operation, code = %error.code, attempt, delay_ms = delay.as_millis() as u64, "ec2 call failed, retrying");
            tokio::time::sleep(delay).await;
        }
    }

    /// Launches one host: each instance type in order until one is accepted.
    async fn launch_host(
        &self,
        request: &LaunchRequest,
        region_config: &RegionCloudConfig,
        host_id: &str,
    ) -> Result<Instance, CloudError> {
        let region = request.region.as_str();
        let credential = self.credentials.issue(host_id);
        let mut refused = Vec::new();
        for instance_type in &request.instance_types {
            let user_data = render_user_data(
                &self.template,
                &UserDataValues {
                    endpoint: &self.endpoint,
                    host_id,
                    region,
                    image: &request.image,
                    capacity: instance_type.capacity,
                    cluster: &request.cluster,
                    credential: &credential,
                },
            )?;
            let spec = RunSpec {
                image: request.image.clone(),
                instance_type: instance_type.name.clone(),
                user_data: STANDARD.encode(user_data),
                client_token: client_token(&request.token, host_id, &instance_type.name),
                tags: vec![
                    ("Name".to_owned(), format!("switchboard-{}-{host_id}", request.cluster)),
                    (TAG_CLUSTER.to_owned(), request.cluster.clone()),
                    (TAG_HOST_ID.to_owned(), host_id.to_owned()),
                    (TAG_LAUNCH_TOKEN.to_owned(), request.token.clone()),
                ],
                subnet_id: region_config.subnet_id.clone(),
                security_group_ids: region_config.security_group_ids.clone(),
                instance_profile: region_config.instance_profile.clone(),
            };
            match self.with_retries(region, "run_instances", || self.api.run_instance(region, &spec)).await {
                Ok(instance) => {
                    info!(
                        region,
                        host_id,
                        instance_id = %instance.instance_id,
                        instance_type = %instance_type.name,
                        fallback = !refused.is_empty(),
                        "instance launched"
                    );
                    return Ok(instance);
                }
                Err(CloudError::Other { code, message, .. }) if classify(&code) == ErrorClass::Capacity => {
                    warn!(region, host_id, instance_type = %instance_type.name, %code, "instance type refused, trying the next");
                    refused.push(TypeRefusal { instance_type: instance_type.name.clone(), code, message });
                }
                Err(error) => return Err(error),
            }
        }
        warn!(region, host_id, refused = refused.len(), "every instance type refused");
        Err(CloudError::InsufficientCapacity { region: region.to_owned(), refused })
    }

    async fn describe(&self, region: &str, filters: Vec<(String, Vec<String>)>) -> Result<Vec<Instance>, CloudError> {
        self.with_retries(region, "describe_instances", || self.api.describe_instances(region, &filters)).await
    }
}

fn to_cloud_error(region: &str, error: ApiError, class: ErrorClass, attempts: u32) -> CloudError {
    let region = region.to_owned();
    match class {
        ErrorClass::Throttled => CloudError::Throttled { region, attempts, code: error.code },
        ErrorClass::Transient => {
            CloudError::Unavailable { region, attempts, message: format!("{}: {}", error.code, error.message) }
        }
        ErrorClass::NotFound => CloudError::NotFound { region, message: error.message },
        ErrorClass::Unauthorized => CloudError::Unauthorized { region, code: error.code, message: error.message },
        // Capacity errors stay `Other` here; `launch_host` turns them into fallbacks.
        ErrorClass::Capacity | ErrorClass::Other => {
            CloudError::Other { region, code: error.code, message: error.message }
        }
    }
}

#[async_trait]
impl CloudProvider for Ec2Provider {
    async fn launch(&self, request: LaunchRequest) -> Result<Vec<Instance>, CloudError> {
        validate_launch(&request)?;
        if request.host_ids.is_empty() {
            return Ok(Vec::new());
        }
        let region = request.region.as_str();
        let region_config = self.regions.get(region).cloned().unwrap_or_default();
        // Idempotency: instances a launch with this token already created.
        let existing = self
            .describe(
                region,
                vec![
                    (format!("tag:{TAG_LAUNCH_TOKEN}"), vec![request.token.clone()]),
                    (format!("tag:{TAG_CLUSTER}"), vec![request.cluster.clone()]),
                ],
            )
            .await?;
        let existing: HashMap<String, Instance> =
            existing.into_iter().filter_map(|i| i.host_id.clone().map(|host| (host, i))).collect();
        if !existing.is_empty() {
            info!(region, token = %request.token, found = existing.len(), "launch repeated, reusing its instances");
        }
        let missing: Vec<String> = request.host_ids.iter().filter(|h| !existing.contains_key(*h)).cloned().collect();
        let (request_ref, region_ref) = (&request, &region_config);
        let launched: HashMap<String, Result<Instance, CloudError>> = stream::iter(missing)
            .map(|host_id: String| async move {
                let result = self.launch_host(request_ref, region_ref, &host_id).await;
                (host_id, result)
            })
            .buffer_unordered(self.launch_concurrency)
            .collect()
            .await;
        let mut instances = Vec::new();
        let mut first_error = None;
        let mut failed = 0usize;
        let mut launched = launched;
        for host_id in &request.host_ids {
            if let Some(instance) = existing.get(host_id) {
                instances.push(instance.clone());
                continue;
            }
            match launched.remove(host_id) {
                Some(Ok(instance)) => instances.push(instance),
                Some(Err(error)) => {
                    failed += 1;
                    warn!(region, host_id, error = %error, "host not launched");
                    first_error.get_or_insert(error);
                }
                None => {}
            }
        }
        match first_error {
            Some(error) if instances.is_empty() => Err(error),
            _ => {
                if failed > 0 {
                    warn!(region, launched = instances.len(), failed, "launch partly failed");
                }
                Ok(instances)
            }
        }
    }

    async fn terminate(&self, region: &str, instance_ids: &[String]) -> Result<(), CloudError> {
        let mut missing = Vec::new();
        for batch in instance_ids.chunks(TERMINATE_BATCH) {
            match self.with_retries(region, "terminate_instances", || self.api.terminate_instances(region, batch)).await
            {
                Ok(()) => info!(region, count = batch.len(), instance_ids = ?batch, "instances terminated"),
                // EC2 refuses the whole call when one id is unknown: terminate the others one by one.
                Err(CloudError::NotFound { .. }) if batch.len() > 1 => {
                    for id in batch {
                        let one = std::slice::from_ref(id);
                        match self
                            .with_retries(region, "terminate_instances", || self.api.terminate_instances(region, one))
                            .await
                        {
                            Ok(()) => info!(region, instance_id = %id, "instance terminated"),
                            Err(CloudError::NotFound { .. }) => missing.push(id.clone()),
                            Err(error) => return Err(error),
                        }
                    }
                }
                Err(CloudError::NotFound { .. }) => missing.extend(batch.iter().cloned()),
                Err(error) => return Err(error),
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            warn!(region, instance_ids = ?missing, "instances to terminate do not exist");
            Err(CloudError::NotFound {
                region: region.to_owned(),
                message: format!("instances {missing:?} do not exist"),
            })
        }
    }

    async fn describe_by_tag(&self, region: &str, cluster: &str) -> Result<Vec<Instance>, CloudError> {
        let instances = self.describe(region, vec![(format!("tag:{TAG_CLUSTER}"), vec![cluster.to_owned()])]).await?;
        debug!(region, cluster, count = instances.len(), "instances listed");
        Ok(instances)
    }
}

/// [`Ec2Api`] on aws-sdk-ec2, one client per region.
struct SdkApi {
    endpoint_url: Option<String>,
    static_credentials: Option<Credentials>,
    /// The default AWS configuration (credential chain), loaded once when no static credentials are set.
    shared: tokio::sync::OnceCell<aws_config::SdkConfig>,
    clients: Mutex<HashMap<String, Client>>,
}

impl SdkApi {
    async fn client(&self, region: &str) -> Client {
        let cached = self.clients.lock().ok().and_then(|clients| clients.get(region).cloned());
        if let Some(client) = cached {
            return client;
        }
        let builder = match &self.static_credentials {
            Some(credentials) => aws_sdk_ec2::Config::builder()
                .behavior_version(BehaviorVersion::latest())
                .credentials_provider(credentials.clone()),
            None => {
                let shared = self.shared.get_or_init(|| aws_config::defaults(BehaviorVersion::latest()).load()).await;
                aws_sdk_ec2::config::Builder::from(shared)
            }
        };
        let mut builder = builder
            .region(Region::new(region.to_owned()))
            // Retries are ours (`Ec2Provider::with_retries`), so they are visible and tested.
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(Duration::from_secs(30))
                    .build(),
            );
        if let Some(url) = &self.endpoint_url {
            builder = builder.endpoint_url(url.clone());
        }
        let client = Client::from_conf(builder.build());
        if let Ok(mut clients) = self.clients.lock() {
            clients.insert(region.to_owned(), client.clone());
        }
        client
    }
}

fn sdk_error<E>(error: SdkError<E>) -> ApiError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &error {
        SdkError::ServiceError(service) => ApiError::new(
            service.err().code().unwrap_or("Unknown"),
            service.err().message().unwrap_or_default().to_owned(),
        ),
        SdkError::TimeoutError(_) => ApiError::new(CODE_TIMEOUT, DisplayErrorContext(&error).to_string()),
        SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            ApiError::new(CODE_TRANSPORT, DisplayErrorContext(&error).to_string())
        }
        _ => ApiError::new("ClientError", DisplayErrorContext(&error).to_string()),
    }
}

fn from_sdk_instance(region: &str, instance: &aws_sdk_ec2::types::Instance) -> Instance {
    let tag =
        |key: &str| instance.tags().iter().find(|t| t.key() == Some(key)).and_then(|t| t.value()).map(str::to_owned);
    Instance {
        instance_id: instance.instance_id().unwrap_or_default().to_owned(),
        host_id: tag(TAG_HOST_ID),
        cluster: tag(TAG_CLUSTER),
        region: region.to_owned(),
        instance_type: instance.instance_type().map(|t| t.as_str().to_owned()).unwrap_or_default(),
        image: instance.image_id().unwrap_or_default().to_owned(),
        state: instance
            .state()
            .and_then(|s| s.name())
            .map(|name| InstanceState::parse(name.as_str()))
            .unwrap_or_else(|| InstanceState::Other("unknown".into())),
        launched_at: instance.launch_time().and_then(|t| DateTime::<Utc>::from_timestamp(t.secs(), t.subsec_nanos())),
    }
}

#[async_trait]
impl Ec2Api for SdkApi {
    async fn run_instance(&self, region: &str, spec: &RunSpec) -> Result<Instance, ApiError> {
        let client = self.client(region).await;
        let mut tags = TagSpecification::builder().resource_type(ResourceType::Instance);
        for (key, value) in &spec.tags {
            tags = tags.tags(Tag::builder().key(key).value(value).build());
        }
        let mut call = client
            .run_instances()
            .image_id(&spec.image)
            .instance_type(InstanceType::from(spec.instance_type.as_str()))
            .min_count(1)
            .max_count(1)
            .user_data(&spec.user_data)
            .client_token(&spec.client_token)
            .tag_specifications(tags.build());
        if !spec.subnet_id.is_empty() {
            call = call.subnet_id(&spec.subnet_id);
        }
        for group in &spec.security_group_ids {
            call = call.security_group_ids(group);
        }
        if !spec.instance_profile.is_empty() {
            call = call
                .iam_instance_profile(IamInstanceProfileSpecification::builder().name(&spec.instance_profile).build());
        }
        let output = call.send().await.map_err(sdk_error)?;
        output
            .instances()
            .first()
            .map(|instance| from_sdk_instance(region, instance))
            .ok_or_else(|| ApiError::new("EmptyResponse", "RunInstances returned no instance"))
    }

    async fn describe_instances(
        &self,
        region: &str,
        filters: &[(String, Vec<String>)],
    ) -> Result<Vec<Instance>, ApiError> {
        let client = self.client(region).await;
        let filters: Vec<Filter> = filters
            .iter()
            .map(|(name, values)| Filter::builder().name(name).set_values(Some(values.clone())).build())
            .collect();
        let mut instances = Vec::new();
        let mut next_token: Option<String> = None;
        loop {
            let output = client
                .describe_instances()
                .set_filters(Some(filters.clone()))
                .set_next_token(next_token.take())
                .send()
                .await
                .map_err(sdk_error)?;
            for reservation in output.reservations() {
                instances.extend(reservation.instances().iter().map(|i| from_sdk_instance(region, i)));
            }
            match output.next_token() {
                Some(token) if !token.is_empty() => next_token = Some(token.to_owned()),
                _ => break,
            }
        }
        Ok(instances)
    }

    async fn terminate_instances(&self, region: &str, instance_ids: &[String]) -> Result<(), ApiError> {
        if instance_ids.is_empty() {
            return Ok(());
        }
        let client = self.client(region).await;
        client.terminate_instances().set_instance_ids(Some(instance_ids.to_vec())).send().await.map_err(sdk_error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;
    use crate::{cloud::InstanceTypeConfig, config::Secret};

    /// Scripted EC2: per instance type, a queue of error codes returned before success.
    #[derive(Default)]
    struct FakeEc2 {
        script: Mutex<HashMap<String, VecDeque<&'static str>>>,
        calls: Mutex<Vec<RunSpec>>,
        launched: Mutex<Vec<(RunSpec, Instance)>>,
    }

    impl FakeEc2 {
        fn fail(&self, instance_type: &str, codes: &[&'static str]) {
            if let Ok(mut script) = self.script.lock() {
                script.entry(instance_type.to_owned()).or_default().extend(codes.iter().copied());
            }
        }

        fn calls(&self) -> Vec<RunSpec> {
            self.calls.lock().map(|c| c.clone()).unwrap_or_default()
        }
    }

    #[async_trait]
    impl Ec2Api for FakeEc2 {
        async fn run_instance(&self, region: &str, spec: &RunSpec) -> Result<Instance, ApiError> {
            if let Ok(mut calls) = self.calls.lock() {
                calls.push(spec.clone());
            }
            let code = self.script.lock().ok().and_then(|mut s| s.get_mut(&spec.instance_type)?.pop_front());
            if let Some(code) = code {
                return Err(ApiError::new(code, "scripted"));
            }
            let mut launched = self.launched.lock().map_err(|_| ApiError::new("Poisoned", ""))?;
            let tag = |key: &str| spec.tags.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
            let instance = Instance {
                instance_id: format!("i-{:017}", launched.len() + 1),
                host_id: tag(TAG_HOST_ID),
                cluster: tag(TAG_CLUSTER),
                region: region.to_owned(),
                instance_type: spec.instance_type.clone(),
                image: spec.image.clone(),
                state: InstanceState::Pending,
                launched_at: Some(Utc::now()),
            };
            launched.push((spec.clone(), instance.clone()));
            Ok(instance)
        }

        async fn describe_instances(
            &self,
            _region: &str,
            filters: &[(String, Vec<String>)],
        ) -> Result<Vec<Instance>, ApiError> {
            let launched = self.launched.lock().map_err(|_| ApiError::new("Poisoned", ""))?;
            Ok(launched
                .iter()
                .filter(|(spec, _)| {
                    filters.iter().all(|(name, values)| {
                        let key = name.trim_start_matches("tag:");
                        spec.tags.iter().any(|(k, v)| k == key && values.contains(v))
                    })
                })
                .map(|(_, instance)| instance.clone())
                .collect())
        }

        async fn terminate_instances(&self, _region: &str, _instance_ids: &[String]) -> Result<(), ApiError> {
            Ok(())
        }
    }

    fn provider(fake: Arc<FakeEc2>, max_attempts: u32) -> Ec2Provider {
        Ec2Provider::with_api(
            fake,
            &CloudConfig::default(),
            "https://switchboard.example.com".into(),
            HostCredentials::new(Secret::new("test-secret")),
            USER_DATA_TEMPLATE.to_owned(),
            RetryPolicy { max_attempts, initial: Duration::from_millis(1), max: Duration::from_millis(4) },
        )
    }

    fn request(host_ids: &[&str]) -> LaunchRequest {
        LaunchRequest {
            region: "us-east-1".into(),
            instance_types: vec![
                InstanceTypeConfig { name: "g4dn.2xlarge".into(), capacity: 2 },
                InstanceTypeConfig { name: "g4dn.12xlarge".into(), capacity: 12 },
            ],
            image: "ami-1".into(),
            host_ids: host_ids.iter().map(|h| (*h).to_owned()).collect(),
            cluster: "test".into(),
            token: "launch-1".into(),
        }
    }

    fn decoded_user_data(spec: &RunSpec) -> String {
        String::from_utf8(STANDARD.decode(&spec.user_data).unwrap_or_default()).unwrap_or_default()
    }

    #[tokio::test]
    async fn falls_back_to_the_next_type_when_one_is_refused() -> Result<(), CloudError> {
        let fake = Arc::new(FakeEc2::default());
        fake.fail("g4dn.2xlarge", &["InsufficientInstanceCapacity"]);
        let instances = provider(fake.clone(), 3).launch(request(&["h-1"])).await?;
        assert_eq!(instances.len(), 1);
        assert_eq!(instances[0].instance_type, "g4dn.12xlarge");
        let calls = fake.calls();
        assert_eq!(
            calls.iter().map(|c| c.instance_type.as_str()).collect::<Vec<_>>(),
            ["g4dn.2xlarge", "g4dn.12xlarge"]
        );
        // The capacity in the user data follows the type actually launched, and the tokens differ per type.
        assert!(decoded_user_data(&calls[1]).contains("HOSTAGENT_CAPACITY=12\n"));
        assert_ne!(calls[0].client_token, calls[1].client_token);
        assert!(calls.iter().all(|c| c.client_token.len() <= 64));
        Ok(())
    }

    #[tokio::test]
    async fn every_type_refused_is_reported_per_region_and_type() {
        let fake = Arc::new(FakeEc2::default());
        fake.fail("g4dn.2xlarge", &["InsufficientInstanceCapacity"]);
        fake.fail("g4dn.12xlarge", &["Unsupported"]);
        let result = provider(fake.clone(), 3).launch(request(&["h-1"])).await;
        match result {
            Err(CloudError::InsufficientCapacity { region, refused }) => {
                assert_eq!(region, "us-east-1");
                let codes: Vec<_> = refused.iter().map(|r| (r.instance_type.as_str(), r.code.as_str())).collect();
                assert_eq!(codes, [("g4dn.2xlarge", "InsufficientInstanceCapacity"), ("g4dn.12xlarge", "Unsupported")]);
            }
            other => panic!("expected insufficient capacity, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn throttling_is_retried_with_backoff() -> Result<(), CloudError> {
        let fake = Arc::new(FakeEc2::default());
        fake.fail("g4dn.2xlarge", &["RequestLimitExceeded", "Throttling"]);
        let instances = provider(fake.clone(), 3).launch(request(&["h-1"])).await?;
        assert_eq!(instances[0].instance_type, "g4dn.2xlarge");
        assert_eq!(fake.calls().len(), 3);
        // Same ClientToken on every retry of one type: EC2 deduplicates them.
        let calls = fake.calls();
        assert!(calls.iter().all(|c| c.client_token == calls[0].client_token));
        Ok(())
    }

    #[tokio::test]
    async fn throttling_past_the_attempts_is_reported() {
        let fake = Arc::new(FakeEc2::default());
        fake.fail("g4dn.2xlarge", &["RequestLimitExceeded"; 5]);
        match provider(fake.clone(), 3).launch(request(&["h-1"])).await {
            Err(error @ CloudError::Throttled { attempts: 3, .. }) => assert!(error.retryable()),
            other => panic!("expected throttled, got {other:?}"),
        }
        // No fallback to another type on throttling.
        assert_eq!(fake.calls().len(), 3);
    }

    #[tokio::test]
    async fn auth_failures_are_not_retried_nor_fallen_back() {
        let fake = Arc::new(FakeEc2::default());
        fake.fail("g4dn.2xlarge", &["UnauthorizedOperation"]);
        match provider(fake.clone(), 3).launch(request(&["h-1"])).await {
            Err(error @ CloudError::Unauthorized { .. }) => assert!(!error.retryable()),
            other => panic!("expected unauthorized, got {other:?}"),
        }
        assert_eq!(fake.calls().len(), 1);
    }

    #[tokio::test]
    async fn a_repeated_launch_reuses_its_instances() -> Result<(), CloudError> {
        let fake = Arc::new(FakeEc2::default());
        let provider = provider(fake.clone(), 3);
        let first = provider.launch(request(&["h-1", "h-2"])).await?;
        let again = provider.launch(request(&["h-1", "h-2"])).await?;
        assert_eq!(first, again);
        assert_eq!(fake.calls().len(), 2);
        Ok(())
    }

    #[tokio::test]
    async fn a_partial_failure_returns_what_launched() -> Result<(), CloudError> {
        let fake = Arc::new(FakeEc2::default());
        // One host gets both refusals; the other launches.
        fake.fail("g4dn.2xlarge", &["InsufficientInstanceCapacity"]);
        fake.fail("g4dn.12xlarge", &["InsufficientInstanceCapacity"]);
        let instances = provider(fake.clone(), 3).launch(request(&["h-1", "h-2"])).await?;
        assert_eq!(instances.len(), 1);
        Ok(())
    }

    #[test]
    fn user_data_carries_the_host_settings_and_the_unit() -> Result<(), CloudError> {
        let values = UserDataValues {
            endpoint: "https://cp.example.com",
            host_id: "h-1",
            region: "eu-west-1",
            image: "ami-1",
            capacity: 2,
            cluster: "prod",
            credential: "hc1.abc",
        };
        let script = render_user_data(USER_DATA_TEMPLATE, &values)?;
        for line in
            ["HOSTAGENT_ENDPOINT=https://cp.example.com\n", "HOSTAGENT_CREDENTIAL=hc1.abc\n", "HOSTAGENT_HOST_ID=h-1\n"]
        {
            assert!(script.contains(line), "{line} missing");
        }
        assert!(script.contains("ExecStart=/usr/local/bin/hostagent"));
        assert!(!script.contains("{{"));
        let bad = UserDataValues { credential: "x\nHOSTAGENT_HOST_ID=other", ..values };
        match render_user_data(USER_DATA_TEMPLATE, &bad) {
            Err(CloudError::Invalid(message)) => assert!(!message.contains("other"), "{message}"),
            other => panic!("expected invalid, got {other:?}"),
        }
        assert!(render_user_data("{{nope}}", &values).is_err());
        Ok(())
    }

    #[test]
    fn errors_are_classified() {
        assert_eq!(classify("RequestLimitExceeded"), ErrorClass::Throttled);
        assert_eq!(classify("InsufficientInstanceCapacity"), ErrorClass::Capacity);
        assert_eq!(classify("InvalidInstanceID.NotFound"), ErrorClass::NotFound);
        assert_eq!(classify("AuthFailure"), ErrorClass::Unauthorized);
        assert_eq!(classify(CODE_TRANSPORT), ErrorClass::Transient);
        let policy =
            RetryPolicy { max_attempts: 5, initial: Duration::from_millis(100), max: Duration::from_millis(1000) };
        assert!(policy.delay(1) <= Duration::from_millis(100));
        assert!(policy.delay(3) >= Duration::from_millis(200) && policy.delay(3) <= Duration::from_millis(400));
        assert!(policy.delay(30) <= Duration::from_millis(1000));
    }
}
