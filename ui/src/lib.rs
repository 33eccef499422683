//! cdp-ui: the operator's views of cdpd as pure functions from data to
//! markup. `cdp-agent` serves them (the status page) and `cdpctl points
//! --svg` writes the timeline to a file; neither this crate nor its callers'
//! renderers do any I/O here, so every view is unit- and property-tested.

mod html;
pub mod model;
mod svg;
pub mod text;

pub use html::status_page_html;
pub use model::*;
pub use svg::timeline_svg;

#[cfg(test)]
mod tests;
