//! Keyset pagination on the wire: `?cursor=&limit=&order=` in, `{items,
//! next_cursor}` out. The cursor is opaque to clients (today the last id of
//! the page; ids are time-ordered).

use super::error::ApiError;
use crate::store::{Order, Page, PageRequest};
use serde::Serialize;
use uuid::Uuid;

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

/// Keyset pagination over a list held in memory (CAs come from the policy,
/// not from a store query), with the same cursor semantics as the store's:
/// ordered by `id` (time-ordered UUIDs), `after` excluded.
pub fn page_in_memory<T>(items: Vec<T>, id: impl Fn(&T) -> Uuid, req: &PageRequest) -> Page<T> {
    let mut items: Vec<(Uuid, T)> = items.into_iter().map(|t| (id(&t), t)).collect();
    match req.order {
        Order::NewestFirst => items.sort_by_key(|b| std::cmp::Reverse(b.0)),
        Order::OldestFirst => items.sort_by_key(|a| a.0),
    }
    let after = req.after;
    let mut rest = items.into_iter().filter(|(i, _)| match (after, req.order) {
        (None, _) => true,
        (Some(a), Order::NewestFirst) => *i < a,
        (Some(a), Order::OldestFirst) => *i > a,
    });
    let limit = req.limit.clamp(1, MAX_LIMIT) as usize;
    let page: Vec<(Uuid, T)> = rest.by_ref().take(limit).collect();
    let next = if rest.next().is_some() {
        page.last().map(|(i, _)| *i)
    } else {
        None
    };
    Page {
        items: page.into_iter().map(|(_, t)| t).collect(),
        next,
    }
}

/// Parses an optional `status=` filter; `""` means none.
pub fn status_filter<T>(
    value: Option<&str>,
    parse: fn(&str) -> Option<T>,
    allowed: &str,
) -> Result<Option<T>, ApiError> {
    match value {
        None | Some("") => Ok(None),
        Some(s) => parse(s).map(Some).ok_or_else(|| {
            ApiError::bad_request("invalid_query", format!("unknown status `{s}` ({allowed})"))
        }),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_memory_pages_walk_every_item_once_in_both_orders() {
        let ids: Vec<Uuid> = (0..7).map(|_| Uuid::now_v7()).collect();
        for order in [Order::NewestFirst, Order::OldestFirst] {
            let mut seen = Vec::new();
            let mut after = None;
            loop {
                let page = page_in_memory(
                    ids.clone(),
                    |u| *u,
                    &PageRequest {
                        after,
                        limit: 3,
                        order,
                    },
                );
                assert!(page.items.len() <= 3);
                seen.extend(page.items);
                match page.next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
            let mut want = ids.clone();
            if order == Order::NewestFirst {
                want.reverse();
            }
            assert_eq!(seen, want);
        }
        // Exactly one full page: no cursor to an empty page.
        let page = page_in_memory(
            ids[..3].to_vec(),
            |u| *u,
            &PageRequest {
                after: None,
                limit: 3,
                order: Order::NewestFirst,
            },
        );
        assert_eq!((page.items.len(), page.next), (3, None));
    }

    #[test]
    fn bad_page_parameters_are_refused() {
        assert!(page_request(Some("nope"), None, None).is_err());
        assert!(page_request(None, Some(0), None).is_err());
        assert!(page_request(None, Some(MAX_LIMIT + 1), None).is_err());
        assert!(page_request(None, None, Some("sideways")).is_err());
        let ok = page_request(None, None, None).unwrap();
        assert_eq!((ok.limit, ok.order), (DEFAULT_LIMIT, Order::NewestFirst));
    }
}
