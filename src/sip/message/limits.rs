//! Hard limits on what Parley accepts from the network. Every length and
//! count a peer controls is checked against one of these before it is used.

/// Largest whole message (headers and body). A UDP datagram cannot be larger,
/// and no legitimate SIP message on a stream needs more.
pub const MAX_MESSAGE_BYTES: usize = 65_535;

/// Largest header section, start line included.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Longest single line, folded continuation lines included.
pub const MAX_LINE_BYTES: usize = 8 * 1024;

/// Most header fields in one message (a comma list counts as one field).
pub const MAX_HEADER_COUNT: usize = 128;

/// Longest URI accepted anywhere.
pub const MAX_URI_BYTES: usize = 2 * 1024;

/// Most digits accepted in Content-Length, CSeq numbers, Expires and the like.
pub const MAX_NUMBER_DIGITS: usize = 10;

/// Most Contact values one REGISTER may carry.
pub const MAX_CONTACTS_PER_REQUEST: usize = 16;

/// Most Via values in one message; more is a loop or an attack.
pub const MAX_VIA_COUNT: usize = 32;
