//! Keyset pagination on the wire: `?cursor=&limit=&order=` in, `{items,
//! next_cursor}` out. The cursor is opaque to clients (today the last id of
//! the page; ids are time-ordered).

use super::error::ApiError;
use crate::store::{Order, Page, PageRequest};
use serde::Serialize;

pub const DEFAULT_LIMIT: u32 = 100;
pub const MAX_LIMIT: u32 = 1000;

/// Parses the pagination parameters of a list request.
pub fn page_request(
    cursor: Option<&str>,
    limit: Option<u32>,
    order: Option<&str>,
) -> Result<PageRequest, ApiError> {
    let after = match cursor {
        None | Some("") => None,
        Some(c) => Some(uuid::Uuid::parse_str(c).map_err(|_| {
            ApiError::bad_request(
                "invalid_query",
                "`cursor` is not a cursor this server issued",
            )
        })?),
    };
    let limit = limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("`limit` must be 1-{MAX_LIMIT}"),
        ));
    }
    let order = match order {
        None | Some("") | Some("newest") => Order::NewestFirst,
        Some("oldest") => Order::OldestFirst,
        Some(o) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("unknown order `{o}` (newest, oldest)"),
            ));
        }
    };
    Ok(PageRequest {
        after,
        limit,
        order,
    })
}

/// One page as returned to clients.
#[derive(Serialize)]
pub struct PageView<T> {
    pub items: Vec<T>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

impl<T> PageView<T> {
    pub fn map<R>(page: Page<R>, f: impl Fn(&R) -> T) -> Self {
        Self {
            items: page.items.iter().map(f).collect(),
            next_cursor: page.next.map(|u| u.to_string()),
        }
    }
}
