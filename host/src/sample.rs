//! Sample domain events for demos, tests and load runs.
//!
//! [`write_ndjson`] writes made-up events that look like what the platform's
//! producers publish. They cover the 19 event types of the auth, catalog,
//! inventory and order services, with payload versions 1.0 and 1.1, and some
//! events with no version at all. Metadata comes in every variant the
//! producers send: empty, without an IP address, with an IPv4 or IPv6
//! address, and with or without a producer-given `event_id`. Text is written
//! in several scripts, with emoji. The events of one request share a
//! `correlation_id`, and some lines repeat an earlier line byte for byte, the
//! way a producer that retries a publish repeats it. Every event passes its
//! schema under `schemas/`, so a sample can be fed straight into a pipeline.
//!
//! The same [`SampleSpec`] always gives the same bytes. A sample file can
//! therefore be regenerated instead of reviewed line by line. `weir sample`
//! is the command-line front end. Addresses are taken from the documentation
//! ranges (RFC 5737 and RFC 3849) and emails from `example.com`.

use std::collections::VecDeque;
use std::io::{self, Write};

/// Options for a generated stream of sample domain events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleSpec {
    /// Number of lines to write, repeated lines included.
    pub count: usize,
    /// Seed of the generator. Equal specs give equal bytes, on any platform.
    pub seed: u64,
    /// Each full run of this many lines has one line that repeats an earlier
    /// line byte for byte, so a stream has exactly `count / duplicate_every`
    /// repeats. 0 means no repeats. 1 is read as 2, because the first line
    /// has nothing before it to repeat.
    pub duplicate_every: usize,
}

impl Default for SampleSpec {
    /// 1,000 lines from seed 1, with one line in 40 repeated.
    fn default() -> Self {
        SampleSpec {
            count: 1000,
            seed: 1,
            duplicate_every: 40,
        }
    }
}

/// Writes `spec.count` lines of NDJSON to `out`, each one event and a `\n`.
///
/// Keys come in the producers' order (`event_type`, `service`, `version`,
/// `timestamp`, `payload`, `metadata`) and are separated by `", "` and
/// `": "`. Non-ASCII text is written as UTF-8, not as `\u` escapes.
///
/// # Errors
///
/// Returns the first error from `out`. The lines written before it stay
/// written.
///
/// # Examples
///
/// ```
/// use weir::sample::{write_ndjson, SampleSpec};
///
/// let spec = SampleSpec { count: 3, ..SampleSpec::default() };
/// let mut out = Vec::new();
/// write_ndjson(&spec, &mut out)?;
/// assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 3);
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn write_ndjson(spec: &SampleSpec, out: &mut impl Write) -> io::Result<()> {
    let mut generator = Generator::new(spec);
    for _ in 0..spec.count {
        let line = generator.next_line();
        out.write_all(line.as_bytes())?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// The exchange that a producing service publishes its events to. The
/// routing key is the event's `event_type`. Returns `None` for a service
/// that is not one of the platform's four producers.
///
/// # Examples
///
/// ```
/// use weir::sample::exchange_for_service;
///
/// assert_eq!(exchange_for_service("order-service"), Some("order_events"));
/// assert_eq!(exchange_for_service("billing-service"), None);
/// ```
pub fn exchange_for_service(service: &str) -> Option<&'static str> {
    match service {
        "auth-service" => Some("auth_events"),
        "catalog-service" => Some("catalog_events"),
        "inventory-service" => Some("inventory_events"),
        "order-service" => Some("order_events"),
        _ => None,
    }
}

/// Every event type with the service that produces it.
const EVENT_TYPES: [(&str, &str); 19] = [
    ("user.registered", "auth-service"),
    ("user.logged_in", "auth-service"),
    ("user.logged_out", "auth-service"),
    ("user.login_failed", "auth-service"),
    ("user.password_changed", "auth-service"),
    ("user.role_granted", "auth-service"),
    ("product.created", "catalog-service"),
    ("product.updated", "catalog-service"),
    ("product.deleted", "catalog-service"),
    ("price.changed", "catalog-service"),
    ("stock.reserved", "inventory-service"),
    ("stock.released", "inventory-service"),
    ("stock.depleted", "inventory-service"),
    ("stock.adjusted", "inventory-service"),
    ("order.created", "order-service"),
    ("order.paid", "order-service"),
    ("order.shipped", "order-service"),
    ("order.cancelled", "order-service"),
    ("order.refunded", "order-service"),
];

/// Requests that emit more than one event, in the order the events are
/// published. All the events of one request share its correlation id.
const MULTI_EVENT_REQUESTS: [&[&str]; 12] = [
    &["order.created", "stock.reserved"],
    &[
        "order.created",
        "stock.reserved",
        "stock.reserved",
        "order.paid",
    ],
    &["order.paid", "order.shipped"],
    &["order.cancelled", "stock.released"],
    &["order.refunded", "stock.adjusted"],
    &["product.created", "price.changed"],
    &["product.updated", "price.changed"],
    &["product.deleted", "stock.adjusted"],
    &["user.registered", "user.logged_in"],
    &["user.login_failed", "user.login_failed", "user.logged_in"],
    &["user.role_granted", "user.logged_out"],
    &["user.password_changed", "user.logged_out"],
];

/// Per mille of requests that emit more than one event.
const MULTI_EVENT_PER_MILLE: u64 = 150;

/// 2026-11-29T12:00:00Z, where every stream starts.
const START_MS: u64 = 1_795_953_600_000;

/// A stream spans about this long, whatever its length.
const SPAN_MS: u64 = 24 * 60 * 60 * 1000;

/// How many of the latest new lines a repeated line can be a copy of.
const RETRY_WINDOW: usize = 8;

const USER_AGENTS: [&str; 8] = [
    "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) \
     Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) \
     Version/17.5 Safari/605.1.15",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 \
     (KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
    "curl/8.5.0",
    "python-requests/2.32.3",
    "okhttp/4.12.0",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
];

const DISPLAY_NAMES: [&str; 18] = [
    "Ana García",
    "Björn Øster",
    "Chloé Dubois",
    "Eun-ji Park",
    "Fatima Al-Sayed",
    "Giulia Rossi",
    "Hiroshi Tanaka",
    "Ingrid Nyström",
    "José Núñez",
    "Zoë O'Brien",
    "Đorđe Petrović",
    "王小明",
    "김민준",
    "Nguyễn Thị Hoa",
    "Ayşe Yılmaz",
    "Σοφία Παπαδάκη",
    "Олег Смирнов",
    "Lucía Ortega 🌻",
];

const LOCALES: [&str; 6] = ["en-US", "es-ES", "ja-JP", "de-DE", "ko-KR", "pt-BR"];
const TAGS: [&str; 4] = ["nuevo", "oferta", "b2b", "eco"];
const COLORS: [&str; 2] = ["rojo", "azul"];
const CARRIERS: [&str; 3] = ["Correos", "DHL", "UPS"];
const ORDER_REASONS: [&str; 3] = ["customer_request", "fraud_check", "out_of_stock"];
const LOGIN_FAILURES: [&str; 3] = ["bad_password", "locked", "mfa_timeout"];
const ROLES: [&str; 3] = ["admin", "billing", "viewer"];

/// Produces the lines of one stream, in order.
struct Generator {
    rng: Rng,
    /// Lines in the stream; fixes where the last full run of repeats ends.
    count: usize,
    /// Lines produced so far.
    index: usize,
    /// Run length for repeats, at least 2; `None` when nothing repeats.
    duplicate_every: Option<usize>,
    /// Index of the line that repeats an earlier one in the current run.
    duplicate_at: Option<usize>,
    /// Last few new lines, the ones a retry can repeat.
    recent: VecDeque<String>,
    /// When the latest request started, in ms since the Unix epoch.
    clock_ms: u64,
    /// Mean time between two requests, so that a stream spans about
    /// `SPAN_MS`.
    mean_gap_ms: u64,
    /// The request being emitted, and the event types it has left.
    request: Request,
    pending: VecDeque<&'static str>,
}

impl Generator {
    fn new(spec: &SampleSpec) -> Self {
        let mut rng = Rng::new(spec.seed);
        let request = Request::new(&mut rng, START_MS, false);
        Generator {
            rng,
            count: spec.count,
            index: 0,
            duplicate_every: (spec.duplicate_every > 0).then(|| spec.duplicate_every.max(2)),
            duplicate_at: None,
            recent: VecDeque::new(),
            clock_ms: START_MS,
            // A request emits about 1.2 events on average.
            mean_gap_ms: (SPAN_MS * 6 / 5 / spec.count.max(1) as u64).max(1),
            request,
            pending: VecDeque::new(),
        }
    }

    fn next_line(&mut self) -> String {
        let index = self.index;
        self.index += 1;

        if let Some(every) = self.duplicate_every {
            // One repeat per full run, never on the run's first line: the
            // stream's first line has nothing before it to repeat.
            if index % every == 0 {
                self.duplicate_at = (index + every <= self.count)
                    .then(|| index + 1 + self.rng.below(every as u64 - 1) as usize);
            }
            if self.duplicate_at == Some(index) {
                return self.repeat();
            }
        }

        let line = self.next_event();
        if self.recent.len() == RETRY_WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(line.clone());
        line
    }

    /// An earlier line again: mostly the one just before, as a producer
    /// that retries at once sends it, and sometimes one a little further
    /// back.
    fn repeat(&mut self) -> String {
        let back = if self.rng.per_mille(750) {
            1
        } else {
            1 + self.rng.below(self.recent.len() as u64) as usize
        };
        self.recent[self.recent.len() - back].clone()
    }

    fn next_event(&mut self) -> String {
        if self.pending.is_empty() {
            self.start_request();
        }
        let event_type = self
            .pending
            .pop_front()
            .expect("a new request has at least one event");
        let mut line = String::new();
        self.event(event_type).write(&mut line);
        line
    }

    fn start_request(&mut self) {
        self.clock_ms += self.rng.below(2 * self.mean_gap_ms + 1);
        let multi = self.rng.per_mille(MULTI_EVENT_PER_MILLE);
        self.request = Request::new(&mut self.rng, self.clock_ms, multi);
        if multi {
            self.pending
                .extend(self.rng.pick(&MULTI_EVENT_REQUESTS).iter().copied());
        } else {
            self.pending.push_back(self.rng.pick(&EVENT_TYPES).0);
        }
    }

    fn event(&mut self, event_type: &'static str) -> Json {
        let service = EVENT_TYPES
            .iter()
            .find(|(name, _)| *name == event_type)
            .map(|(_, service)| *service)
            .expect("every event type in a request is listed in EVENT_TYPES");
        let at_ms = self.request.advance(&mut self.rng);
        let payload = self.payload(event_type);
        let metadata = self.request.metadata(&mut self.rng);

        let mut fields = vec![
            ("event_type", Json::str(event_type)),
            ("service", Json::str(service)),
        ];
        // About 3% of events carry no version, and a quarter are on 1.1.
        match self.rng.below(1000) {
            0..=29 => {}
            30..=259 => fields.push(("version", Json::str("1.1"))),
            _ => fields.push(("version", Json::str("1.0"))),
        }
        fields.push(("timestamp", Json::Str(format_timestamp(at_ms))));
        fields.push(("payload", payload));
        fields.push(("metadata", metadata));
        Json::Obj(fields)
    }

    fn payload(&mut self, event_type: &str) -> Json {
        let rng = &mut self.rng;
        let request = &mut self.request;
        let org = (
            "organization_id",
            Json::Str(request.organization_id.clone()),
        );
        let mut fields = vec![org];
        match event_type.split_once('.').map_or("", |(entity, _)| entity) {
            "user" => user_payload(rng, request, event_type, &mut fields),
            "product" | "price" => product_payload(rng, request, event_type, &mut fields),
            "stock" => stock_payload(rng, request, event_type, &mut fields),
            _ => order_payload(rng, request, event_type, &mut fields),
        }
        Json::Obj(fields)
    }
}

fn user_payload(rng: &mut Rng, request: &mut Request, event_type: &str, fields: &mut Fields) {
    let subject = request.subject.get_or_insert_with(|| Subject::new(rng));
    fields.push(("user_id", Json::Str(subject.user_id.clone())));
    fields.push(("email", Json::Str(subject.email.clone())));
    match event_type {
        "user.registered" => {
            fields.push(("display_name", Json::str(rng.pick(&DISPLAY_NAMES))));
            fields.push(("locale", Json::str(rng.pick(&LOCALES))));
        }
        "user.login_failed" => {
            subject.failed_attempts += 1;
            fields.push(("reason", Json::str(rng.pick(&LOGIN_FAILURES))));
            fields.push(("attempt", Json::Int(subject.failed_attempts)));
        }
        "user.role_granted" => {
            fields.push(("role", Json::str(rng.pick(&ROLES))));
            fields.push(("granted_by", Json::Str(uuid_v4(rng))));
        }
        _ => {}
    }
}

fn product_payload(rng: &mut Rng, request: &mut Request, event_type: &str, fields: &mut Fields) {
    let product = request.product.get_or_insert_with(|| Product::new(rng));
    fields.push(("product_id", Json::Str(product.product_id.clone())));
    fields.push(("sku", Json::Str(product.sku.clone())));
    match event_type {
        "product.created" | "product.updated" => {
            let first = rng.below(TAGS.len() as u64) as usize;
            let second = (first + 1 + rng.below(TAGS.len() as u64 - 1) as usize) % TAGS.len();
            let tags = vec![Json::str(TAGS[first]), Json::str(TAGS[second])];
            let attributes = vec![
                ("color", Json::str(rng.pick(&COLORS))),
                ("weight_g", Json::Int(20 + rng.below(4980) as i64)),
            ];
            fields.push(("name", Json::Str(product.name.clone())));
            fields.push(("tags", Json::Arr(tags)));
            fields.push(("attributes", Json::Obj(attributes)));
        }
        "price.changed" => {
            // A change of up to 25% either way, never to zero.
            let old = product.price_cents;
            let change = rng.below(old as u64 / 2 + 1) as i64 - old / 4;
            let new = (old + change).max(1);
            product.price_cents = new;
            fields.push(("old_price", Json::Money(old)));
            fields.push(("new_price", Json::Money(new)));
            fields.push(("currency", Json::str("EUR")));
        }
        _ => {}
    }
}

fn stock_payload(rng: &mut Rng, request: &mut Request, event_type: &str, fields: &mut Fields) {
    // Stock moves for an order follow its lines; otherwise they concern the
    // request's product, or any SKU.
    let (sku, quantity) = match (&mut request.order, &request.product) {
        (Some(order), _) => {
            let line = &order.lines[order.next_line % order.lines.len()];
            order.next_line += 1;
            (line.sku.clone(), line.qty)
        }
        (None, Some(product)) => (product.sku.clone(), 1 + rng.below(50) as i64),
        (None, None) => (random_sku(rng), 1 + rng.below(50) as i64),
    };
    let warehouse = *request.warehouse.get_or_insert_with(|| 1 + rng.below(9));
    fields.push(("sku", Json::Str(sku)));
    fields.push(("warehouse_id", Json::Str(format!("WH-{warehouse}"))));
    fields.push(("quantity", Json::Int(quantity)));
    if event_type == "stock.adjusted" {
        // Never 0: a count that finds nothing to correct emits no event.
        let size = 1 + rng.below(20) as i64;
        let delta = if rng.per_mille(500) { size } else { -size };
        fields.push(("delta", Json::Int(delta)));
        fields.push(("reason", Json::str("cycle_count")));
    }
}

fn order_payload(rng: &mut Rng, request: &mut Request, event_type: &str, fields: &mut Fields) {
    let order = request.order.get_or_insert_with(|| Order::new(rng));
    let lines = order.lines.iter().map(|line| {
        Json::Obj(vec![
            ("sku", Json::Str(line.sku.clone())),
            ("qty", Json::Int(line.qty)),
            ("unit_price", Json::Money(line.unit_price_cents)),
        ])
    });
    fields.push(("order_id", Json::Str(order.order_id.clone())));
    fields.push(("customer_id", Json::Str(order.customer_id.clone())));
    fields.push(("lines", Json::Arr(lines.collect())));
    fields.push(("total", Json::Money(order.total_cents())));
    fields.push(("currency", Json::str("EUR")));
    match event_type {
        "order.shipped" => {
            fields.push(("carrier", Json::str(rng.pick(&CARRIERS))));
            fields.push((
                "tracking",
                Json::Str(format!("TRK{:09}", rng.below(1_000_000_000))),
            ));
        }
        "order.cancelled" | "order.refunded" => {
            fields.push(("reason", Json::str(rng.pick(&ORDER_REASONS))));
        }
        _ => {}
    }
}

/// Which metadata fields a request's events carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MetadataShape {
    /// `{}`, as from an internal job.
    Empty,
    /// Only a producer-given `event_id`.
    EventId,
    /// Only a `correlation_id`.
    Correlation,
    /// `event_id`, then `correlation_id`.
    EventIdAndCorrelation,
    /// Correlation id, caller, address when known, user agent, and an
    /// `event_id` on about half the events.
    Full,
}

/// What the events of one request have in common.
struct Request {
    shape: MetadataShape,
    correlation_id: String,
    /// Caller, for `metadata.user_id`.
    user_id: String,
    ip_address: Option<String>,
    user_agent: &'static str,
    organization_id: String,
    /// Time of the request's latest event, in ms since the Unix epoch.
    at_ms: u64,
    /// Entities the request's events are about, made on first use.
    subject: Option<Subject>,
    product: Option<Product>,
    order: Option<Order>,
    warehouse: Option<u64>,
}

impl Request {
    /// A new request at `at_ms`. A request with several events always
    /// carries full metadata, so that its events share a correlation id.
    fn new(rng: &mut Rng, at_ms: u64, multi_event: bool) -> Self {
        let shape = match rng.below(1000) {
            _ if multi_event => MetadataShape::Full,
            0..=29 => MetadataShape::Empty,
            30..=44 => MetadataShape::EventId,
            45..=47 => MetadataShape::Correlation,
            48..=50 => MetadataShape::EventIdAndCorrelation,
            _ => MetadataShape::Full,
        };
        let ip_address = match rng.below(100) {
            0..=9 => None,
            10..=27 => Some(ipv6(rng)),
            28..=49 => Some(format!("198.51.100.{}", 1 + rng.below(254))),
            _ => Some(format!("203.0.113.{}", 1 + rng.below(254))),
        };
        Request {
            shape,
            correlation_id: uuid_v4(rng),
            user_id: uuid_v4(rng),
            ip_address,
            user_agent: rng.pick(&USER_AGENTS),
            organization_id: uuid_v4(rng),
            at_ms,
            subject: None,
            product: None,
            order: None,
            warehouse: None,
        }
    }

    /// Moves the request's clock on to its next event and returns it.
    fn advance(&mut self, rng: &mut Rng) -> u64 {
        self.at_ms += 5 + rng.below(800);
        self.at_ms
    }

    fn metadata(&self, rng: &mut Rng) -> Json {
        let correlation = || ("correlation_id", Json::Str(self.correlation_id.clone()));
        let fields = match self.shape {
            MetadataShape::Empty => vec![],
            MetadataShape::EventId => vec![("event_id", Json::Str(uuid_v4(rng)))],
            MetadataShape::Correlation => vec![correlation()],
            MetadataShape::EventIdAndCorrelation => {
                vec![("event_id", Json::Str(uuid_v4(rng))), correlation()]
            }
            MetadataShape::Full => {
                let mut fields = vec![correlation(), ("user_id", Json::Str(self.user_id.clone()))];
                if let Some(ip) = &self.ip_address {
                    fields.push(("ip_address", Json::Str(ip.clone())));
                }
                fields.push(("user_agent", Json::str(self.user_agent)));
                if rng.per_mille(500) {
                    fields.push(("event_id", Json::Str(uuid_v4(rng))));
                }
                fields
            }
        };
        Json::Obj(fields)
    }
}

/// The user that auth events are about (not the caller).
struct Subject {
    user_id: String,
    email: String,
    failed_attempts: i64,
}

impl Subject {
    fn new(rng: &mut Rng) -> Self {
        Subject {
            user_id: uuid_v4(rng),
            email: format!("user{}@example.com", 100 + rng.below(9900)),
            failed_attempts: rng.below(3) as i64,
        }
    }
}

struct Product {
    product_id: String,
    sku: String,
    name: String,
    price_cents: i64,
}

impl Product {
    fn new(rng: &mut Rng) -> Self {
        let n = 1 + rng.below(999);
        // Mostly the catalog's default naming, with other scripts, emoji
        // and a quoted word now and then.
        let name = match rng.below(10) {
            0 => format!("Té matcha {n} 🍵"),
            1 => format!("抹茶ラテ {n}"),
            2 => format!("Taza \"Clásica\" {n}"),
            3 => format!("Crème brûlée {n} 🍮"),
            _ => format!("Producto {n} ☕"),
        };
        Product {
            product_id: uuid_v4(rng),
            sku: random_sku(rng),
            name,
            price_cents: 100 + rng.below(60_000) as i64,
        }
    }
}

struct OrderLine {
    sku: String,
    qty: i64,
    unit_price_cents: i64,
}

struct Order {
    order_id: String,
    customer_id: String,
    lines: Vec<OrderLine>,
    /// The line the next stock event of the request concerns.
    next_line: usize,
}

impl Order {
    fn new(rng: &mut Rng) -> Self {
        let lines = (0..1 + rng.below(6))
            .map(|_| OrderLine {
                sku: random_sku(rng),
                qty: 1 + rng.below(4) as i64,
                unit_price_cents: 100 + rng.below(19_900) as i64,
            })
            .collect();
        Order {
            order_id: uuid_v4(rng),
            customer_id: uuid_v4(rng),
            lines,
            next_line: 0,
        }
    }

    fn total_cents(&self) -> i64 {
        self.lines
            .iter()
            .map(|line| line.qty * line.unit_price_cents)
            .sum()
    }
}

fn random_sku(rng: &mut Rng) -> String {
    format!("SKU-{:05}", 1 + rng.below(399))
}

/// A random (version 4) uuid, lowercase, in the 8-4-4-4-12 form.
fn uuid_v4(rng: &mut Rng) -> String {
    let high = (rng.next_u64() & !0xf000) | 0x4000;
    let low = (rng.next_u64() & !(0b11 << 62)) | (0b10 << 62);
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        high >> 32,
        (high >> 16) & 0xffff,
        high & 0xffff,
        low >> 48,
        low & 0xffff_ffff_ffff
    )
}

/// An address in 2001:db8::/32, in one of the two forms that logs show:
/// only the last group, or two groups around the `::`.
fn ipv6(rng: &mut Rng) -> String {
    let last = 1 + rng.below(0xffff);
    if rng.per_mille(700) {
        format!("2001:db8::{last:x}")
    } else {
        format!("2001:db8:{:x}::{last:x}", 1 + rng.below(0xffff))
    }
}

/// `ms` since the Unix epoch as RFC 3339 UTC with milliseconds, e.g.
/// `2026-11-29T16:01:15.135Z`.
fn format_timestamp(ms: u64) -> String {
    let (mut days, ms_of_day) = (ms / 86_400_000, ms % 86_400_000);
    let mut year = 1970;
    while days >= days_in_year(year) {
        days -= days_in_year(year);
        year += 1;
    }
    let mut month = 1;
    while days >= days_in_month(year, month) {
        days -= days_in_month(year, month);
        month += 1;
    }
    let seconds = ms_of_day / 1000;
    format!(
        "{year:04}-{month:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        days + 1,
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60,
        ms_of_day % 1000
    )
}

fn is_leap(year: u64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_year(year: u64) -> u64 {
    if is_leap(year) {
        366
    } else {
        365
    }
}

fn days_in_month(year: u64, month: u64) -> u64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

type Fields = Vec<(&'static str, Json)>;

/// Just enough JSON to write a line with its keys in a fixed order. A
/// `serde_json::Map` would sort them, or not, depending on whether some
/// other crate turns on `preserve_order`.
enum Json {
    Str(String),
    Int(i64),
    /// An amount in cents, written as a number with up to two decimals.
    Money(i64),
    Arr(Vec<Json>),
    Obj(Fields),
}

impl Json {
    fn str(s: &str) -> Json {
        Json::Str(s.to_owned())
    }

    /// Appends the value with `", "` and `": "` between items.
    fn write(&self, out: &mut String) {
        match self {
            Json::Str(s) => write_string(s, out),
            Json::Int(n) => out.push_str(&n.to_string()),
            Json::Money(cents) => out.push_str(&format_money(*cents)),
            Json::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    item.write(out);
                }
                out.push(']');
            }
            Json::Obj(fields) => {
                out.push('{');
                for (i, (key, value)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    write_string(key, out);
                    out.push_str(": ");
                    value.write(out);
                }
                out.push('}');
            }
        }
    }
}

/// Writes `s` as a JSON string. Only `"`, `\` and control characters are
/// escaped; everything else stays as UTF-8.
fn write_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c < ' ' => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Cents as the shortest decimal that reads back as the same float, the
/// way producers print amounts: `1250` is `12.5`, `28500` is `285.0`.
fn format_money(cents: i64) -> String {
    let (sign, cents) = if cents < 0 {
        ("-", -cents)
    } else {
        ("", cents)
    };
    let (units, fraction) = (cents / 100, cents % 100);
    if fraction % 10 == 0 {
        format!("{sign}{units}.{}", fraction / 10)
    } else {
        format!("{sign}{units}.{fraction:02}")
    }
}

/// splitmix64: small, fast, and the same on every platform, which is all a
/// sample needs. Not for anything secret.
struct Rng {
    state: u64,
}

impl Rng {
    fn new(seed: u64) -> Self {
        Rng { state: seed }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n`; 0 when `n` is 0.
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// True `n` times in 1,000.
    fn per_mille(&mut self, n: u64) -> bool {
        self.below(1000) < n
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};
    use std::error::Error;

    use serde_json::Value;

    use super::*;

    type TestResult = Result<(), Box<dyn Error>>;

    fn generate(spec: &SampleSpec) -> Result<String, Box<dyn Error>> {
        let mut out = Vec::new();
        write_ndjson(spec, &mut out)?;
        Ok(String::from_utf8(out)?)
    }

    fn spec(count: usize, seed: u64, duplicate_every: usize) -> SampleSpec {
        SampleSpec {
            count,
            seed,
            duplicate_every,
        }
    }

    #[test]
    fn same_seed_gives_same_bytes() -> TestResult {
        let first = generate(&SampleSpec::default())?;
        assert_eq!(first, generate(&SampleSpec::default())?);
        assert_ne!(first, generate(&spec(1000, 2, 40))?);
        Ok(())
    }

    #[test]
    fn every_line_is_an_event_object() -> TestResult {
        let text = generate(&spec(2000, 7, 40))?;
        for line in text.lines() {
            let event: Value = serde_json::from_str(line)?;
            let event_type = event["event_type"].as_str().ok_or("no event_type")?;
            let service = event["service"].as_str().ok_or("no service")?;
            let (_, producer) = EVENT_TYPES
                .iter()
                .find(|(name, _)| *name == event_type)
                .ok_or("unknown event_type")?;
            assert_eq!(service, *producer, "{line}");
            assert!(exchange_for_service(service).is_some(), "{line}");
            assert!(event["payload"].is_object(), "{line}");
            assert!(event["metadata"].is_object(), "{line}");
            assert!(
                event["timestamp"].as_str().is_some_and(|t| t.len() == 24),
                "{line}"
            );
        }
        Ok(())
    }

    #[test]
    fn keys_come_in_producer_order() -> TestResult {
        let text = generate(&spec(50, 3, 0))?;
        for line in text.lines() {
            assert!(line.starts_with("{\"event_type\": \""), "{line}");
            let payload = line.find("\"payload\": {").ok_or("no payload")?;
            assert!(
                line.find("\"timestamp\": \"")
                    .is_some_and(|at| at < payload),
                "{line}"
            );
            assert!(
                line.find("\"metadata\": {").is_some_and(|at| at > payload),
                "{line}"
            );
        }
        Ok(())
    }

    #[test]
    fn distinct_lines_match_duplicate_rate() -> TestResult {
        for (count, duplicate_every, distinct) in [
            (1000, 40, 975),
            (1000, 0, 1000),
            (100, 7, 86),
            (39, 40, 39),
            (10, 1, 5),
        ] {
            let text = generate(&spec(count, 11, duplicate_every))?;
            let lines: Vec<&str> = text.lines().collect();
            let unique: HashSet<&str> = lines.iter().copied().collect();
            assert_eq!(lines.len(), count);
            assert_eq!(
                unique.len(),
                distinct,
                "count {count}, every {duplicate_every}"
            );
        }
        Ok(())
    }

    #[test]
    fn all_types_appear_in_1000_events() -> TestResult {
        let text = generate(&SampleSpec::default())?;
        let mut seen = HashSet::new();
        for line in text.lines() {
            let event: Value = serde_json::from_str(line)?;
            seen.insert(
                event["event_type"]
                    .as_str()
                    .ok_or("no event_type")?
                    .to_owned(),
            );
        }
        assert_eq!(seen.len(), EVENT_TYPES.len());
        Ok(())
    }

    #[test]
    fn stream_has_the_variety_producers_send() -> TestResult {
        let text = generate(&SampleSpec::default())?;
        let events: Vec<Value> = text
            .lines()
            .collect::<HashSet<_>>()
            .into_iter()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        let count = |test: &dyn Fn(&Value) -> bool| events.iter().filter(|e| test(e)).count();
        let meta = |e: &Value, key: &str| {
            e["metadata"]
                .get(key)
                .and_then(Value::as_str)
                .map(str::to_owned)
        };

        let with_event_id = count(&|e| meta(e, "event_id").is_some());
        assert!((events.len() * 2 / 5..events.len() * 3 / 5).contains(&with_event_id));
        assert!(count(&|e| e.get("version").is_none()) > 0);
        assert!(count(&|e| e["version"] == "1.1") > 100);
        assert!(count(&|e| e["metadata"].as_object().is_some_and(|m| m.is_empty())) > 0);
        assert!(count(&|e| meta(e, "user_agent").is_some() && meta(e, "ip_address").is_none()) > 0);
        assert!(count(&|e| meta(e, "ip_address").is_some_and(|ip| ip.contains(':'))) > 0);
        assert!(count(&|e| meta(e, "ip_address").is_some_and(|ip| ip.contains('.'))) > 0);
        assert!(text.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c)));
        assert!(text.chars().any(|c| c >= '\u{1f300}'));

        let mut by_correlation: HashMap<String, usize> = HashMap::new();
        for id in events.iter().filter_map(|e| meta(e, "correlation_id")) {
            *by_correlation.entry(id).or_default() += 1;
        }
        assert!(by_correlation.values().filter(|&&n| n >= 2).count() > 50);
        Ok(())
    }

    #[test]
    fn uuids_look_like_version_4() {
        let mut rng = Rng::new(5);
        for _ in 0..100 {
            let id = uuid_v4(&mut rng);
            let groups: Vec<&str> = id.split('-').collect();
            let lengths: Vec<usize> = groups.iter().map(|g| g.len()).collect();
            assert_eq!(lengths, [8, 4, 4, 4, 12], "{id}");
            assert!(groups[2].starts_with('4'), "{id}");
            assert!(groups[3].starts_with(['8', '9', 'a', 'b']), "{id}");
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(format_timestamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_timestamp(START_MS), "2026-11-29T12:00:00.000Z");
        assert_eq!(
            format_timestamp(1_709_251_199_999),
            "2024-02-29T23:59:59.999Z"
        );
    }

    #[test]
    fn money_reads_like_a_float() {
        assert_eq!(format_money(28_500), "285.0");
        assert_eq!(format_money(1_250), "12.5");
        assert_eq!(format_money(106_954), "1069.54");
        assert_eq!(format_money(5), "0.05");
    }

    #[test]
    fn strings_escape_only_what_json_requires() {
        let mut out = String::new();
        write_string("Taza \"Clásica\" \\ 王\n\u{1}", &mut out);
        assert_eq!(out, r#""Taza \"Clásica\" \\ 王\n\u0001""#);
    }

    #[test]
    fn exchange_follows_service() {
        assert_eq!(exchange_for_service("auth-service"), Some("auth_events"));
        assert_eq!(
            exchange_for_service("catalog-service"),
            Some("catalog_events")
        );
        assert_eq!(
            exchange_for_service("inventory-service"),
            Some("inventory_events")
        );
        assert_eq!(exchange_for_service("order-service"), Some("order_events"));
        assert_eq!(exchange_for_service("Order-Service"), None);
    }
}
