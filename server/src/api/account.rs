//! `switchboard.v1.AccountService`; error codes are documented in the proto.

use switchboard_proto::v1::{
    Account, BillingUrl, GetAccountRequest, GetBillingUrlRequest, account_service_server::AccountService,
};
use tonic::{Request, Response, Status};

use crate::{accounts::Accounts, auth::Principal};

pub struct AccountApi {
    pub accounts: Accounts,
}

#[tonic::async_trait]
impl AccountService for AccountApi {
    async fn get_account(&self, request: Request<GetAccountRequest>) -> Result<Response<Account>, Status> {
        let principal = Principal::from_request(&request)?;
        Ok(Response::new(self.accounts.get_account(&principal).await?))
    }

    async fn get_billing_url(&self, request: Request<GetBillingUrlRequest>) -> Result<Response<BillingUrl>, Status> {
        let principal = Principal::from_request(&request)?;
        Ok(Response::new(self.accounts.billing_url(&principal, &request.get_ref().return_url).await?))
    }
}
