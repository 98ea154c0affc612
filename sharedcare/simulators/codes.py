"""Code systems and the representative codes the clinical generator draws from.

SNOMED CT, LOINC with UCUM units, dm+d-style medicine codes (``https://dmd.nhs.uk``) and CVX
vaccine codes: representative of what UK records carry, for demos and load, not a curated
terminology.
"""

from __future__ import annotations

from typing import Final

SCT: Final = "http://snomed.info/sct"
LOINC: Final = "http://loinc.org"
UCUM: Final = "http://unitsofmeasure.org"
DMD: Final = "https://dmd.nhs.uk"
CVX: Final = "http://hl7.org/fhir/sid/cvx"
OBS_CATEGORY: Final = "http://terminology.hl7.org/CodeSystem/observation-category"
COND_CATEGORY: Final = "http://terminology.hl7.org/CodeSystem/condition-category"
COND_CLINICAL: Final = "http://terminology.hl7.org/CodeSystem/condition-clinical"
COND_VERIFICATION: Final = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
ACT_CODE: Final = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
V2_0074: Final = "http://terminology.hl7.org/CodeSystem/v2-0074"
INTERPRETATION: Final = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
MED_REQ_CATEGORY: Final = "http://terminology.hl7.org/CodeSystem/medicationrequest-category"
MED_STMT_CATEGORY: Final = "http://terminology.hl7.org/CodeSystem/medication-statement-category"
ALLERGY_CLINICAL: Final = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical"
ALLERGY_VERIFICATION: Final = (
    "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification"
)

# -- the long-term picture -----------------------------------------------------------------
# (SNOMED code, display, minimum age, prevalence, regular medicine keys)
CONDITIONS: Final = (
    ("44054006", "Type 2 diabetes mellitus", 35, 0.12, ("metformin", "atorvastatin")),
    ("38341003", "Hypertensive disorder", 35, 0.25, ("amlodipine", "ramipril")),
    ("195967001", "Asthma", 3, 0.10, ("salbutamol", "beclometasone")),
    ("13645005", "Chronic obstructive lung disease", 45, 0.05, ("salbutamol", "tiotropium")),
    ("49436004", "Atrial fibrillation", 55, 0.06, ("apixaban", "bisoprolol")),
    ("53741008", "Coronary arteriosclerosis", 50, 0.06, ("aspirin", "atorvastatin")),
    ("709044004", "Chronic kidney disease", 50, 0.07, ()),
    ("35489007", "Depressive disorder", 16, 0.09, ("sertraline",)),
    ("55822004", "Hyperlipidaemia", 40, 0.12, ("atorvastatin",)),
    ("396275006", "Osteoarthritis", 45, 0.10, ("paracetamol",)),
    ("40930008", "Hypothyroidism", 30, 0.04, ("levothyroxine",)),
    ("84114007", "Heart failure", 60, 0.03, ("bisoprolol", "furosemide")),
)
# Acute problems an encounter may be about: (SNOMED, display, acute medicine key)
ACUTE: Final = (
    ("68566005", "Urinary tract infectious disease", "nitrofurantoin"),
    ("233604007", "Pneumonia", "amoxicillin"),
    ("195662009", "Acute viral pharyngitis", "paracetamol"),
    ("10509002", "Acute bronchitis", "amoxicillin"),
    ("263204007", "Fracture of wrist", "codeine"),
    ("22298006", "Myocardial infarction", "aspirin"),
    ("128045006", "Cellulitis", "flucloxacillin"),
)
# medicine key: (dm+d-style VMP code, display, dose text, daily frequency)
MEDICINES: Final = {
    "metformin": ("325278007", "Metformin 500mg tablets", "One tablet twice a day with food", 2),
    "atorvastatin": ("320000009", "Atorvastatin 20mg tablets", "One tablet at night", 1),
    "amlodipine": ("319283006", "Amlodipine 5mg tablets", "One tablet once a day", 1),
    "ramipril": ("318906001", "Ramipril 5mg capsules", "One capsule once a day", 1),
    "salbutamol": (
        "320176004",
        "Salbutamol 100micrograms/dose inhaler CFC free",
        "Two puffs when required for breathlessness",
        4,
    ),
    "beclometasone": (
        "320158001",
        "Beclometasone 100micrograms/dose inhaler CFC free",
        "Two puffs twice a day",
        2,
    ),
    "tiotropium": (
        "407896005",
        "Tiotropium 18microgram inhalation powder capsules",
        "Inhale one capsule once a day",
        1,
    ),
    "apixaban": ("703907003", "Apixaban 5mg tablets", "One tablet twice a day", 2),
    "bisoprolol": ("318420003", "Bisoprolol 2.5mg tablets", "One tablet once a day", 1),
    "aspirin": ("319770009", "Aspirin 75mg dispersible tablets", "One tablet once a day", 1),
    "sertraline": ("321949006", "Sertraline 50mg tablets", "One tablet once a day", 1),
    "paracetamol": (
        "322236009",
        "Paracetamol 500mg tablets",
        "Two tablets up to four times a day",
        4,
    ),
    "levothyroxine": (
        "315258000",
        "Levothyroxine sodium 50microgram tablets",
        "One tablet each morning",
        1,
    ),
    "furosemide": ("317972000", "Furosemide 40mg tablets", "One tablet each morning", 1),
    "nitrofurantoin": (
        "376835001",
        "Nitrofurantoin 100mg modified-release capsules",
        "One capsule twice a day for 3 days",
        2,
    ),
    "amoxicillin": (
        "323509004",
        "Amoxicillin 500mg capsules",
        "One capsule three times a day for 5 days",
        3,
    ),
    "flucloxacillin": (
        "323575006",
        "Flucloxacillin 500mg capsules",
        "One capsule four times a day for 7 days",
        4,
    ),
    "codeine": (
        "322497008",
        "Codeine 30mg tablets",
        "One tablet up to four times a day when required",
        4,
    ),
}
ACUTE_DAYS: Final = {"nitrofurantoin": 3, "amoxicillin": 5, "flucloxacillin": 7, "codeine": 7}
# (SNOMED disorder code, display, category, criticality, reaction SNOMED, reaction display)
ALLERGIES: Final = (
    ("91936005", "Allergy to penicillin", "medication", "high", "271807003", "Eruption of skin"),
    ("293586001", "Allergy to aspirin", "medication", "low", "247472004", "Urticaria"),
    ("91935009", "Allergy to peanuts", "food", "high", "39579001", "Anaphylaxis"),
    ("300913006", "Shellfish allergy", "food", "high", "39579001", "Anaphylaxis"),
    ("418689008", "Allergy to grass pollen", "environment", "low", "76067001", "Sneezing"),
    ("300916003", "Latex allergy", "environment", "low", "247472004", "Urticaria"),
)
VACCINES: Final = (
    ("140", "Influenza, seasonal, injectable, preservative free"),
    ("208", "COVID-19, mRNA, LNP-S, PF, 30 mcg/0.3 mL dose"),
    ("33", "pneumococcal polysaccharide vaccine, 23 valent"),
    ("115", "Tdap"),
    ("187", "zoster vaccine recombinant"),
)
PROCEDURES: Final = (
    ("29303009", "Electrocardiographic procedure", "103693007", "Diagnostic procedure"),
    ("399208008", "Plain chest X-ray", "103693007", "Diagnostic procedure"),
    ("73761001", "Colonoscopy", "103693007", "Diagnostic procedure"),
    ("80146002", "Appendicectomy", "387713003", "Surgical procedure"),
    ("38102005", "Cholecystectomy", "387713003", "Surgical procedure"),
    ("609588000", "Total knee replacement", "387713003", "Surgical procedure"),
    ("52734007", "Total hip replacement", "387713003", "Surgical procedure"),
)
# Encounter kinds: (v3 ActCode class, class display, SNOMED type, type display, service)
ENCOUNTERS: Final = (
    ("AMB", "ambulatory", "185347001", "Encounter for problem", "General practice"),
    ("AMB", "ambulatory", "390906007", "Follow-up encounter", "Outpatient clinic"),
    ("EMER", "emergency", "50849002", "Emergency room admission", "Emergency department"),
    ("IMP", "inpatient encounter", "183452005", "Emergency hospital admission", "Acute medicine"),
)
# Vital signs (http://hl7.org/fhir/R4/observation-vitalsigns.html): LOINC, display, UCUM unit, range
VITALS: Final = (
    ("8867-4", "Heart rate", "/min", "beats/minute", (55, 100)),
    ("9279-1", "Respiratory rate", "/min", "breaths/minute", (12, 20)),
    ("8310-5", "Body temperature", "Cel", "C", (36.1, 37.6)),
    ("59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry", "%", "%", (94, 99)),
    ("29463-7", "Body weight", "kg", "kg", (55, 105)),
)
BLOOD_PRESSURE: Final = ("85354-9", "Blood pressure panel with all children optional")
# Laboratory panels: (LOINC panel, display, v2-0074 section, [(LOINC, display, UCUM, low, high)])
PANELS: Final = (
    (
        "58410-2", "CBC panel - Blood by Automated count", "HM",
        (
            ("718-7", "Hemoglobin [Mass/volume] in Blood", "g/L", 115, 165),
            ("6690-2", "Leukocytes [#/volume] in Blood by Automated count", "10*9/L", 4.0, 11.0),
            ("777-3", "Platelets [#/volume] in Blood by Automated count", "10*9/L", 150, 400),
        ),
    ),
    (
        "24362-6", "Renal function 2000 panel - Serum or Plasma", "CH",
        (
            ("2951-2", "Sodium [Moles/volume] in Serum or Plasma", "mmol/L", 133, 146),
            ("2823-3", "Potassium [Moles/volume] in Serum or Plasma", "mmol/L", 3.5, 5.3),
            ("14682-9", "Creatinine [Moles/volume] in Serum or Plasma", "umol/L", 59, 104),
            ("62238-1", "Glomerular filtration rate/1.73 sq M.predicted [Volume Rate/Area] in Serum, Plasma or Blood by Creatinine-based formula (CKD-EPI)", "mL/min/{1.73_m2}", 60, 120),
        ),
    ),
    (
        "57698-3", "Lipid panel with direct LDL - Serum or Plasma", "CH",
        (
            ("14647-2", "Cholesterol [Moles/volume] in Serum or Plasma", "mmol/L", 3.0, 5.0),
            ("14646-4", "Cholesterol in HDL [Moles/volume] in Serum or Plasma", "mmol/L", 1.0, 2.2),
        ),
    ),
    (
        "59261-8", "Hemoglobin A1c/Hemoglobin.total in Blood by IFCC protocol", "CH",
        (("59261-8", "Hemoglobin A1c/Hemoglobin.total in Blood by IFCC protocol", "mmol/mol", 20, 41),),
    ),
)  # fmt: skip
DOCUMENTS: Final = (
    ("18842-5", "Discharge summary", "373942005", "Discharge summary"),
    ("11488-4", "Consult note", "371530004", "Clinical consultation report"),
    ("34133-9", "Summary of episode note", "371531000", "Report of clinical encounter"),
)
XHTML: Final = '<div xmlns="http://www.w3.org/1999/xhtml">'
PHRASES: Final = (
    "Patient seen and examined.",
    "Observations stable throughout the episode.",
    "No new concerns raised by the patient or family.",
    "Medication reconciled against the GP record on admission.",
    "Advised to return if symptoms worsen or fail to settle.",
    "Bloods reviewed with the patient; results discussed.",
    "Safety-netting advice given and understood.",
    "Follow-up arranged with the GP in two weeks.",
    "Mobilising independently on the ward.",
    "Eating and drinking normally.",
    "Pain controlled with simple analgesia.",
    "Blood pressure reviewed; lifestyle advice given.",
    "Inhaler technique checked and satisfactory.",
    "Smoking cessation discussed; referred to local service.",
)
